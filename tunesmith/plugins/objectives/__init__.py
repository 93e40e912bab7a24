"""The built-in training objectives, one module each (entry points ``objective.*``)."""
