"""``tunesmith config validate|schema|show``."""

from __future__ import annotations

import click

from tunesmith.commands._common import echo_json, json_option, set_option


@click.group("config")
def command() -> None:
    """Validate a config, show it resolved, or print the JSON Schema."""


@command.command("validate")
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@set_option
@json_option
def validate(config_path: str, overrides: tuple[str, ...], as_json: bool) -> None:
    """Check CONFIG against the schema and every named plugin's options."""
    from tunesmith.commands._common import load_cli_config
    from tunesmith.core.errors import ConfigError

    try:
        cfg = load_cli_config(config_path, overrides)
    except ConfigError as exc:
        if as_json:
            echo_json({"valid": False, "errors": exc.errors, "key": exc.key, "line": exc.line, "source": exc.source})
            raise SystemExit(exc.exit_code) from None
        raise
    if as_json:
        echo_json({"valid": True, "config": cfg.to_dict(), "hash": cfg.hash()})
    else:
        click.echo(f"{config_path}: valid (hash {cfg.hash()})")


@command.command("show")
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@set_option
def show(config_path: str, overrides: tuple[str, ...]) -> None:
    """Print CONFIG resolved: defaults filled in, overrides applied (YAML)."""
    import yaml

    from tunesmith.commands._common import load_cli_config

    cfg = load_cli_config(config_path, overrides)
    click.echo(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


@command.command("schema")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write to a file instead of stdout.")
@click.pass_context
def schema(ctx: click.Context, output: str | None) -> None:
    """Print the JSON Schema of the whole config, installed plugins' options included."""
    import json

    from tunesmith.cli import get_state
    from tunesmith.core.config import config_schema
    from tunesmith.core.io import atomic_write_text

    data = config_schema(get_state(ctx).registries())
    if output:
        atomic_write_text(output, json.dumps(data, indent=2) + "\n")
        click.echo(f"wrote {output}")
    else:
        echo_json(data)
