"""petl_lightning."""
__version__ = "0.1.0"
