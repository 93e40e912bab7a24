"""``tunesmith export CONFIG|RUN_DIR --format adapter|merged|gguf -o OUT``."""

from __future__ import annotations

from pathlib import Path

import click

from tunesmith.commands._common import echo_json, json_option, set_option


def _parse_options(items: tuple[str, ...]) -> dict:
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise click.BadParameter(f"expected KEY=VALUE, got '{item}'", param_hint="--option")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v) if v.strip() else ""
    return out


@click.command("export")
@click.argument("source", metavar="CONFIG|RUN_DIR", type=click.Path(exists=True))
@click.option("-f", "--format", "formats", multiple=True, metavar="NAME",
              help="Exporter: adapter, merged, gguf or a plugin's (repeatable; default: the config's export list, else adapter).")
@click.option("-o", "--output", type=click.Path(), help="Where to write (a folder; GGUF: a .gguf file or a folder). One format only.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--type", "gguf_type", metavar="TYPE", help="GGUF tensor type: f16, bf16, f32, q8_0, q4_0, q4_1, q5_0, q5_1.")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE", help="An exporter option, e.g. --option dtype=bfloat16.")
@set_option
@json_option
@click.pass_context
def command(ctx: click.Context, source: str, formats: tuple[str, ...], output: str | None, overwrite: bool,
            gguf_type: str | None, options: tuple[str, ...], overrides: tuple[str, ...], as_json: bool) -> None:
    """Export a finished run: a PEFT adapter folder, a merged safetensors model or a GGUF file.

    SOURCE is a run directory (with final/) or the config that trained it
    (its output_dir is the run directory). Without -o the artefact goes to
    RUN/exports/<format> (GGUF: RUN/exports/gguf/model-<type>.gguf).
    """
    from tunesmith.cli import get_state
    from tunesmith.core.export import export_run

    src = Path(source)
    extra = _parse_options(options)
    if gguf_type:
        extra["type"] = gguf_type
    config_entries: dict[str, dict] = {}
    if src.is_file():
        from tunesmith.commands._common import load_cli_config
        from tunesmith.core.rundir import RunDir

        cfg = load_cli_config(str(src), overrides)
        regs = get_state(ctx).registries(cfg.plugins.disable)
        run_dir = RunDir.for_config(cfg).root
        for spec in cfg.export:
            config_entries[spec.format] = spec.plugin_fields()
        if not formats:
            formats = tuple(config_entries) or ("adapter",)
    else:
        regs = get_state(ctx).registries()
        run_dir = src
        formats = formats or ("adapter",)
    if output and len(formats) > 1:
        raise click.BadParameter("-o/--output takes one --format", param_hint="--output")
    results = []
    for fmt in formats:
        opts = {**config_entries.get(fmt, {}), **(extra if (fmt == "gguf" or "type" not in extra) else
                                                   {k: v for k, v in extra.items() if k != "type"})}
        path = export_run(run_dir, fmt, output, overwrite=overwrite, registries=regs, options=opts)
        results.append({"format": fmt, "path": str(path)})
        if not as_json:
            click.echo(f"{fmt}: {path}")
    if as_json:
        echo_json({"run_dir": str(run_dir), "exports": results})
