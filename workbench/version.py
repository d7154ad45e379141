"""The package version (one place; `workbench.__version__` and saved files read it)."""
__version__ = "0.1.0"
