"""The package version, in a module of its own so that the cluster can compare it without importing the session."""

__version__ = "0.1.0"
