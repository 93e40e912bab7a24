"""Small helpers shared by the built-in commands."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config value, e.g. --set training.max_steps=20 (repeatable).",
)
output_option = click.option("-o", "--output", type=click.Path(), help="Where to write the result.")


def echo_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def load_cli_config(path: str, overrides: tuple[str, ...] = ()) -> Any:
    """Load a config with the root command's --disable/--strict applied."""
    from tunesmith.cli import get_state
    from tunesmith.core.config import load_config, read_yaml

    state = get_state()
    data, _ = read_yaml(path)
    disable = tuple((data.get("plugins") or {}).get("disable") or ())
    return load_config(path, overrides, registries=state.registries(disable))
