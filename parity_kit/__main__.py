"""``python -m parity_kit`` runs the ``parity-kit`` command (same subcommands, same exit status)."""

import sys

from .app.cli import main

if __name__ == "__main__":
    sys.exit(main())
