"""The package version: a leaf module, so that any module can stamp files without importing the package."""

__version__ = "0.1.0"
