"""The detector families, one concept per module (detect/family.py says what a family
is; detect/engine.py's FAMILIES, the order they run in)."""
