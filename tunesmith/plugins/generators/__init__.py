"""Built-in generators plugins, one module per technique, each registered as an entry point."""
