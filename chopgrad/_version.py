"""The version of the chopgrad package, importable without the rest of it."""
__version__ = "0.1.0"
