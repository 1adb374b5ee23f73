"""The version of duogard, a leaf module: what reads it (checkpoints) need not import the package root."""

__version__ = "0.1.0"
