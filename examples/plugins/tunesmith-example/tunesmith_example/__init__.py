"""An example third-party tunesmith plugin package."""

__version__ = "0.2.0"
