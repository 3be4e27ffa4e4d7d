"""Training code (needs the `train` extra). It may import the rest; nothing imports it."""
