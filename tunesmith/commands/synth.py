"""``tunesmith synth``: paraphrase instructions or generate new examples from seeds."""

from __future__ import annotations

from pathlib import Path

import click

from tunesmith.commands._common import echo_json, json_option


@click.group("synth")
def command() -> None:
    """Generate synthetic data; every generated row is marked and cleaned."""


def _common(f):  # type: ignore[no-untyped-def]
    f = click.option("--generator", default="local", show_default=True, help="Generator plugin (local, openai, ...).")(f)
    f = click.option("--gen-set", "gen_set", multiple=True, metavar="KEY=VALUE",
                     help="A generator option, e.g. --gen-set temperature=0.7 (repeatable; values parsed as YAML).")(f)
    f = click.option("--cleaner", "cleaners", multiple=True, help="Cleaners to run (default: the standard chain).")(f)
    f = click.option("--no-clean", is_flag=True, help="Skip cleaning (not recommended).")(f)
    f = click.option("--include-originals", is_flag=True, help="Write the inputs too, cleaned together with the new rows.")(f)
    f = click.option("--format", "fmt", default="auto", show_default=True, help="Input data format.")(f)
    f = click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output JSONL.")(f)
    f = json_option(f)
    return f


def _gen_options(pairs: tuple[str, ...]) -> dict:
    import yaml

    from tunesmith.core.errors import TunesmithError

    out: dict = {}
    for p in pairs:
        if "=" not in p:
            raise TunesmithError(f"--gen-set expects KEY=VALUE, got '{p}'")
        k, v = p.split("=", 1)
        out[k.strip()] = yaml.safe_load(v) if v.strip() else ""
    return out


def _run(mode: str, data: str, n: int, shots: int, seed: int, generator: str, gen_set: tuple[str, ...],
         cleaners: tuple[str, ...], no_clean: bool, include_originals: bool, fmt: str, output: str, as_json: bool) -> None:
    from tunesmith.cli import get_state
    from tunesmith.core.data import load_records, write_records
    from tunesmith.core.io import atomic_write_jsonl
    from tunesmith.synth import synthesize

    regs = get_state().registries()
    records = load_records(data, format=fmt, registries=regs)
    result = synthesize(
        records, mode=mode, generator=generator, options=_gen_options(gen_set), n=n, shots=shots, seed=seed,
        cleaners=[] if no_clean else (list(cleaners) or None), include_originals=include_originals, registries=regs,
    )
    out = Path(output)
    write_records(result["records"], out)
    rejects_path = out.with_name(out.stem + ".rejects.jsonl")
    atomic_write_jsonl(rejects_path, result["rejects"] + [{"stage": "generate", **f} for f in result["failures"]])
    summary = {**result["summary"], "output": str(out), "rejects": str(rejects_path)}
    if as_json:
        echo_json(summary)
    else:
        click.echo(
            f"{summary['prompts']} prompts -> {summary['generated']} generated ({summary['unparsed']} unusable), "
            f"{summary['kept']} kept after cleaning, {summary['rejected']} rejected; wrote {out} (rejects: {rejects_path})"
        )


@command.command("paraphrase")
@click.argument("data", type=click.Path(exists=True))
@click.option("-n", "n", type=int, default=1, show_default=True, help="Paraphrases per row.")
@_common
def paraphrase_cmd(data: str, n: int, **kw: object) -> None:
    """Paraphrase the instruction (last user turn) of each row; answers are kept.

    Example: tunesmith synth paraphrase train.jsonl -n 2 -o augmented.jsonl
    """
    _run("paraphrase", data, n, 0, 42, **kw)  # type: ignore[arg-type]


@command.command("seeds")
@click.argument("data", type=click.Path(exists=True))
@click.option("-n", "n", type=int, default=10, show_default=True, help="New examples to generate.")
@click.option("--shots", type=int, default=3, show_default=True, help="Seed examples shown per prompt.")
@click.option("--seed", type=int, default=42, show_default=True)
@_common
def seeds_cmd(data: str, n: int, shots: int, seed: int, **kw: object) -> None:
    """Generate new examples in the style of seed examples.

    Example: tunesmith synth seeds seeds.jsonl -n 50 --generator openai
    --gen-set base_url=http://127.0.0.1:8000/v1 -o generated.jsonl
    """
    _run("seeds", data, n, shots, seed, **kw)  # type: ignore[arg-type]
