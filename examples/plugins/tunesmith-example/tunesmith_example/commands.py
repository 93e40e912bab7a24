"""A CLI command contributed through ``register_commands``."""

from __future__ import annotations

import click

from tunesmith import hookimpl


@hookimpl
def register_commands(cli):
    @cli.command("example-info")
    def example_info() -> None:
        """Show what the tunesmith-example package adds."""
        from tunesmith_example import __version__

        click.echo(f"tunesmith-example {__version__}: cleaners banned_words, normalize (typography); evaluator keyword_coverage")
