"""The package version, in a module of its own: setup.cfg reads it without importing torch."""

__version__ = "0.2.0"
