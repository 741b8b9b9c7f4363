"""One module per story notebook: its plan, its measurements in order, and the conclusion they support."""
