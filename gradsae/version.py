"""gradsae's version, in a module of its own so that any layer can read it without importing
the package's public face (``gradsae/__init__.py``, which imports every layer)."""

__version__ = "0.1.0"
