"""Built-in CLI commands, one module per top-level command; each exposes ``command``."""
