"""Cape: confidential computing for Python functions."""

__version__ = "0.1.0"
