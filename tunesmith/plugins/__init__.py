"""The built-in techniques. Core never imports this package: each module is an entry point."""
