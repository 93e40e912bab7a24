"""``tunesmith data``: inspect, validate, clean, convert, split, mix and chunk data files."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

import click

from tunesmith.commands._common import echo_json, json_option

format_option = click.option("--format", "fmt", default="auto", show_default=True,
                             help="Input data format (a data-format plugin name), or auto-detect.")
skip_option = click.option("--skip-invalid", is_flag=True,
                           help="Send unreadable rows to the rejects file instead of stopping at the first.")


def _regs() -> Any:
    from tunesmith.cli import get_state

    return get_state().registries()


def _context(cfg: Any, regs: Any, tokenizer: str | None) -> Any:
    from tunesmith.core.context import RunContext

    ctx = RunContext(config=cfg, registries=regs)
    if tokenizer:
        ctx.state["tokenizer_path"] = tokenizer
    return ctx


def _progress() -> bool:
    return sys.stderr.isatty()


def _say(as_json: bool, text: str) -> None:
    if not as_json:
        click.echo(text)


@click.group("data")
def command() -> None:
    """Inspect, validate, clean, convert, split, mix and chunk data."""


# --------------------------------------------------------------------------- inspect
@command.command("inspect")
@click.argument("path", type=click.Path())
@format_option
@click.option("-n", "--show", default=2, show_default=True, help="Rows to show.")
@json_option
def inspect_cmd(path: str, fmt: str, show: int, as_json: bool) -> None:
    """Show a file's format, size, fields and first rows."""
    from tunesmith.core.data import (
        completion_text, detect_format, iter_raw_rows, load_records, prompt_text, record_kind,
    )

    regs = _regs()
    raw = []
    for rr in iter_raw_rows(path):
        raw.append(rr)
        if len(raw) >= 200:
            break
    fields = Counter(k for rr in raw if isinstance(rr.row, dict) for k in rr.row)
    fmt_obj = (detect_format([rr.row for rr in raw if rr.error is None], registries=regs, source=path)
               if fmt == "auto" and Path(path).suffix.lower() not in (".txt", ".md", ".text")
               else regs.data_formats.get("text" if fmt == "auto" else fmt))
    rejects: list[dict] = []
    records = load_records(path, format=fmt_obj.name, registries=regs, skip_invalid=True, rejects=rejects)
    turns = Counter(len(r["messages"]) for r in records if "messages" in r)
    info = {
        "path": path,
        "format": fmt_obj.name,
        "kind": record_kind(records[0]) if records else getattr(fmt_obj, "kind", None),
        "rows": len(records),
        "invalid_rows": len(rejects),
        "fields": dict(fields.most_common()),
        "turns": {str(k): v for k, v in sorted(turns.items())},
        "average_prompt_chars": round(sum(len(prompt_text(r)) for r in records) / max(1, len(records)), 1),
        "average_completion_chars": round(sum(len(completion_text(r)) for r in records) / max(1, len(records)), 1),
        "sample": records[:show],
    }
    if rejects:
        info["first_problems"] = [f"{r['source']}:{r.get('line', r.get('row'))}: {r['reason']}" for r in rejects[:5]]
    if as_json:
        echo_json(info)
        return
    click.echo(f"{path}: {info['format']} ({info['kind']}), {info['rows']} valid rows, {info['invalid_rows']} invalid")
    click.echo(f"fields (first {len(raw)} rows): " + ", ".join(f"{k} ({v})" for k, v in fields.most_common()))
    if turns:
        click.echo("turns per row: " + ", ".join(f"{k}: {v}" for k, v in info["turns"].items()))
    click.echo(f"average characters: prompt {info['average_prompt_chars']}, completion {info['average_completion_chars']}")
    for p in info.get("first_problems", []):
        click.echo(f"  problem: {p}")
    import json

    for r in info["sample"]:
        click.echo(json.dumps(r, ensure_ascii=False)[:500])


# --------------------------------------------------------------------------- validate
@command.command("validate")
@click.argument("path", type=click.Path())
@format_option
@click.option("--max-tokens", type=int, default=None, help="Flag rows over this many tokens (needs the tokenizer).")
@click.option("--tokenizer", type=click.Path(), default=None, help="Tokenizer folder for --max-tokens.")
@json_option
def validate_cmd(path: str, fmt: str, max_tokens: int | None, tokenizer: str | None, as_json: bool) -> None:
    """Check every row; list problems by file:line. Exit 3 if any row is invalid."""
    from tunesmith.core.data import load_records
    from tunesmith.core.data_report import build_report

    regs = _regs()
    rejects: list[dict] = []
    records = load_records(path, format=fmt, registries=regs, skip_invalid=True, rejects=rejects)
    tok = None
    if max_tokens:
        from tunesmith.core.data_clean import get_tokenizer

        tok = get_tokenizer(_context(None, regs, tokenizer))
    rep = build_report(records, load_rejects=rejects, tokenizer=tok, max_tokens=max_tokens or 2048)
    rep.pop("_lengths", None)
    rep["problems"] = [{"where": f"{r['source']}:{r.get('line', r.get('row'))}", "reason": r["reason"]} for r in rejects]
    if as_json:
        echo_json(rep)
    else:
        click.echo(f"{path}: {rep['valid']} valid, {rep['invalid']} invalid rows ({rep['valid_ratio']:.1%} valid)")
        for p in rep["problems"][:50]:
            click.echo(f"  {p['where']}: {p['reason']}")
        if len(rep["problems"]) > 50:
            click.echo(f"  ... and {len(rep['problems']) - 50} more")
        if rep["issues"]:
            click.echo("issues: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in rep["issues"].items()))
    if rejects:
        sys.exit(3)


# --------------------------------------------------------------------------- clean
@command.command("clean")
@click.argument("path", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="Cleaned file (.jsonl, .json or .parquet).")
@click.option("--config", "config_path", type=click.Path(), default=None,
              help="A run config: its data.cleaners (and model, for token limits) are used.")
@click.option("--cleaner", "cleaner_names", multiple=True, help="Run these cleaners (repeatable) instead.")
@click.option("--rejects", "rejects_path", type=click.Path(), default=None,
              help="Where dropped rows go (default: OUTPUT's name + .rejects.jsonl).")
@click.option("--report", "report_path", type=click.Path(), default=None,
              help="Write a Markdown report here (+ .json and _token_lengths.png beside it).")
@click.option("--to", "to_fmt", default=None, help="Write rows in this format (default: canonical records).")
@click.option("--tokenizer", type=click.Path(), default=None, help="Tokenizer folder for token-based limits.")
@format_option
@skip_option
@json_option
def clean_cmd(path: str, output: str, config_path: str | None, cleaner_names: tuple[str, ...], rejects_path: str | None,
              report_path: str | None, to_fmt: str | None, tokenizer: str | None, fmt: str, skip_invalid: bool,
              as_json: bool) -> None:
    """Run the cleaners (the config's, or the defaults) over a file."""
    from tunesmith.core.data import load_records, write_records
    from tunesmith.core.data_clean import clean_records, get_tokenizer
    from tunesmith.core.data_report import build_report, write_report
    from tunesmith.core.io import atomic_write_jsonl

    regs = _regs()
    cfg = None
    cleaners = None
    if config_path:
        from tunesmith.commands._common import load_cli_config

        cfg = load_cli_config(config_path)
        cleaners = cfg.data.cleaners
        if fmt == "auto":
            fmt = cfg.data.format
    if cleaner_names:
        cleaners = list(cleaner_names)
    ctx = _context(cfg, regs, tokenizer)
    load_rejects: list[dict] = []
    records = load_records(path, format=fmt, registries=regs, skip_invalid=skip_invalid, rejects=load_rejects)
    res = clean_records(records, cleaners, registries=regs, context=ctx, progress=_progress() and not as_json,
                        total=len(records))
    write_records(res.records, output, format=to_fmt, registries=regs)
    out = Path(output)
    rej = Path(rejects_path) if rejects_path else out.with_name(out.name.split(".")[0] + ".rejects.jsonl")
    atomic_write_jsonl(rej, load_rejects + res.rejects)
    summary = {"input": path, "output": output, "rejects": str(rej), "rows_in": len(records) + len(load_rejects),
               "unreadable": len(load_rejects), **{k: v for k, v in res.summary().items() if k != "rows_in"}}
    if report_path:
        rp = Path(report_path)
        tok = get_tokenizer(ctx)
        rep = build_report(res.records, clean=res, load_rejects=load_rejects, tokenizer=tok)
        write_report(rep, md=rp, json_path=rp.with_suffix(".json"), png=rp.with_name(rp.stem + "_token_lengths.png"))
        summary["report"] = str(rp)
    if as_json:
        echo_json(summary)
        return
    click.echo(f"{summary['rows_in']} rows in, {summary['kept']} kept, {summary['rejected'] + summary['unreadable']} "
               f"rejected -> {output} (rejects: {rej})")
    for c in summary["cleaners"]:
        extra = ", ".join(f"{k} {v}" for k, v in {**c["reasons"], **c["replacements"]}.items())
        click.echo(f"  {c['name']:<14} kept {c['kept']:>7}  rejected {c['rejected']:>6}  rewritten {c['modified']:>6}"
                   + (f"  ({extra})" if extra else ""))


# --------------------------------------------------------------------------- convert
@command.command("convert")
@click.argument("path", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="Output file (.jsonl, .json or .parquet).")
@click.option("--to", "to_fmt", required=True, help="Target format (a data-format plugin name).")
@format_option
@skip_option
@json_option
def convert_cmd(path: str, output: str, to_fmt: str, fmt: str, skip_invalid: bool, as_json: bool) -> None:
    """Convert a file to another format (an error when the target cannot hold a row)."""
    from tunesmith.core.data import load_records, write_records

    regs = _regs()
    regs.data_formats.get(to_fmt)  # a clear error for an unknown name, before reading
    rejects: list[dict] = []
    records = load_records(path, format=fmt, registries=regs, skip_invalid=skip_invalid, rejects=rejects)
    write_records(records, output, format=to_fmt, registries=regs, keep_location=False)
    summary = {"input": path, "output": output, "to": to_fmt, "rows": len(records), "skipped": len(rejects)}
    if as_json:
        echo_json(summary)
    else:
        click.echo(f"{len(records)} rows -> {output} ({to_fmt})" + (f", {len(rejects)} skipped" if rejects else ""))


# --------------------------------------------------------------------------- split
@command.command("split")
@click.argument("path", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="Folder for train/validation/test.jsonl.")
@click.option("--train", default=0.8, show_default=True, type=float)
@click.option("--validation", default=0.1, show_default=True, type=float)
@click.option("--test", default=0.1, show_default=True, type=float)
@click.option("--seed", default=42, show_default=True, type=int)
@click.option("--stratify", default=None, help="Metadata field to stratify on (e.g. category).")
@format_option
@skip_option
@json_option
def split_cmd(path: str, output: str, train: float, validation: float, test: float, seed: int, stratify: str | None,
              fmt: str, skip_invalid: bool, as_json: bool) -> None:
    """Split a file deterministically into train/validation/test (clean it first to dedupe)."""
    from tunesmith.core.data import load_records, write_records
    from tunesmith.core.data_ops import SPLITS, cross_split_duplicates, split_records

    regs = _regs()
    rejects: list[dict] = []
    records = load_records(path, format=fmt, registries=regs, skip_invalid=skip_invalid, rejects=rejects)
    parts = split_records(records, train=train, validation=validation, test=test, seed=seed, stratify=stratify)
    out = Path(output)
    for s in SPLITS:
        write_records(parts[s], out / f"{s}.jsonl")
    summary = {"output": str(out), **{s: len(parts[s]) for s in SPLITS},
               "cross_split_duplicates": cross_split_duplicates(parts), "skipped": len(rejects)}
    if as_json:
        echo_json(summary)
        return
    click.echo(f"train {summary['train']}, validation {summary['validation']}, test {summary['test']} -> {out}")
    if summary["cross_split_duplicates"]:
        click.echo(f"warning: {summary['cross_split_duplicates']} rows also appear in another split; "
                   "run `tunesmith data clean` first", err=True)


# --------------------------------------------------------------------------- mix
@command.command("mix")
@click.argument("config_path", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="Mixed file (.jsonl, .json or .parquet).")
@json_option
def mix_cmd(config_path: str, output: str, as_json: bool) -> None:
    """Mix the config's data.sources by data.mixing (and data.replay) into one file."""
    from tunesmith.commands._common import load_cli_config
    from tunesmith.core.data import load_records, write_records
    from tunesmith.core.data_ops import add_replay, mix_sources
    from tunesmith.core.errors import ConfigError

    cfg = load_cli_config(config_path)
    regs = _regs()
    d = cfg.data
    srcs = d.sources or ([] if not d.path else [type("S", (), {"path": d.path, "weight": None, "format": d.format})()])
    if not srcs:
        raise ConfigError("nothing to mix: set data.sources", key="data.sources", source=config_path)
    sources = []
    for s in srcs:
        f = s.format if s.format != "auto" else d.format
        sources.append({"name": s.path, "weight": s.weight,
                        "records": load_records(cfg.resolve_path(s.path), format=f, registries=regs,
                                                skip_invalid=d.skip_invalid, rejects=[])})
    mixed, summary = mix_sources(sources, strategy=d.mixing.strategy, temperature=d.mixing.temperature,
                                 seed=d.mixing.seed)
    if d.replay is not None:
        replay = load_records(cfg.resolve_path(d.replay.path), format=d.replay.format, registries=regs,
                              skip_invalid=d.skip_invalid, rejects=[])
        mixed, summary["replay"] = add_replay(mixed, replay, d.replay.ratio, seed=d.mixing.seed)
    write_records(mixed, output)
    summary.update(output=output, rows=len(mixed))
    if as_json:
        echo_json(summary)
        return
    click.echo(f"{len(mixed)} rows ({summary['strategy']}) -> {output}")
    for s in summary["sources"]:
        click.echo(f"  {s['name']}: {s['drawn']} of {s['size']} (weight {s['weight']}, share {s['share']:.1%})")
    if "replay" in summary:
        click.echo(f"  replay: {summary['replay']['rows']} rows ({summary['replay']['ratio']:.0%})")


# --------------------------------------------------------------------------- chunk
@command.command("chunk")
@click.argument("path", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="Chunks (.jsonl): text, input_ids, metadata.")
@click.option("--size", default=2048, show_default=True, help="Tokens per chunk.")
@click.option("--overlap", default=0, show_default=True, help="Tokens shared by consecutive chunks.")
@click.option("--no-pack", is_flag=True, help="Cut each document on its own instead of concatenating them.")
@click.option("--tokenizer", type=click.Path(), default=None, help="Tokenizer folder (default: the default model's).")
@click.option("--text-unit", type=click.Choice(["paragraph", "line", "file"]), default="file", show_default=True,
              help="How .txt files become documents.")
@format_option
@json_option
def chunk_cmd(path: str, output: str, size: int, overlap: int, no_pack: bool, tokenizer: str | None, text_unit: str,
              fmt: str, as_json: bool) -> None:
    """Cut a raw-text corpus into chunks of N tokens for continued pre-training."""
    from tunesmith.core.data import load_records, write_records
    from tunesmith.core.data_clean import get_tokenizer
    from tunesmith.core.data_ops import chunk_texts

    regs = _regs()
    records = load_records(path, format=fmt, registries=regs, text_unit=text_unit)
    tok = get_tokenizer(_context(None, regs, tokenizer))
    chunks = chunk_texts(records, tok, chunk_size=size, overlap=overlap, pack=not no_pack)
    write_records(chunks, output)
    summary = {"documents": len(records), "chunks": len(chunks), "tokens": sum(len(c["input_ids"]) for c in chunks),
               "output": output}
    if as_json:
        echo_json(summary)
    else:
        click.echo(f"{summary['documents']} documents -> {summary['chunks']} chunks of up to {size} tokens -> {output}")
