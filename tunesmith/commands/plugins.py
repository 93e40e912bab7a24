"""``tunesmith plugins``: every area, name, description, distribution and status."""

from __future__ import annotations

import click

from tunesmith.commands._common import echo_json, json_option


@click.command("plugins")
@json_option
@click.option("--area", help="Only this area (e.g. peft_methods).")
@click.pass_context
def command(ctx: click.Context, as_json: bool, area: str | None) -> None:
    """List installed plugins by area, with where each came from.

    Status: active, replaced (by another plugin), conflict (two plugins claim
    the name), disabled or failed (could not be loaded; see the error).
    """
    from tunesmith.cli import get_state

    regs = get_state(ctx).registries()
    data = regs.as_dict()
    if area:
        if area not in data["areas"]:
            raise click.BadParameter(f"unknown area '{area}'; areas: {', '.join(data['areas'])}", param_hint="--area")
        data["areas"] = {area: data["areas"][area]}
    if as_json:
        echo_json(data)
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for key, entries in data["areas"].items():
        table = Table(title=key, title_justify="left", show_lines=False, expand=False)
        for col in ("name", "description", "distribution", "version", "status"):
            table.add_column(col, overflow="fold")
        if not entries:
            table.add_row("-", "(none registered)", "", "", "")
        for e in entries:
            status = e["status"]
            if e.get("replaced_by"):
                status += f" by {e['replaced_by']}"
            if e.get("replaces"):
                status += f" (replaces {e['replaces']})"
            if e.get("note"):
                status += f": {e['note']}"
            table.add_row(e["name"], e["description"], e["distribution"], e["version"], status)
        console.print(table)
    disabled = [p for p in data["plugins"] if p["status"] == "disabled"]
    if disabled:
        console.print("disabled: " + ", ".join(f"{p['name']} ({p['distribution']})" for p in disabled))
    for f in data["failures"]:
        console.print(
            f"[red]failed[/red]: {f['name']} from {f['distribution']} {f['version']} ({f['entry_point']}): {f['error']}",
            highlight=False,
        )
    for w in data["warnings"]:
        console.print(f"[yellow]warning[/yellow]: {w}", highlight=False)
