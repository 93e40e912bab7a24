"""Built-in models plugins, one module per technique, each registered as an entry point."""
