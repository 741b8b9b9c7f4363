"""The built-in data and models: the generated corpus and the training that produces the committed weights."""
