"""Hooks for the command line."""

from __future__ import annotations

from typing import Any

from tunesmith._markers import hookspec


@hookspec
def register_commands(cli: Any) -> None:
    """Add click commands or groups to the ``tunesmith`` command line.

    :param cli: the root :class:`click.Group`; call ``cli.add_command(cmd)``.

    Example::

        @hookimpl
        def register_commands(cli):
            @cli.command()
            def hello():
                "Say hello."
                click.echo("hello")
    """
