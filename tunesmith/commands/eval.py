"""``tunesmith eval CONFIG`` and ``tunesmith eval compare``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from tunesmith.commands._common import echo_json, json_option, load_cli_config, set_option


class _DefaultGroup(click.Group):
    """``eval CONFIG`` runs the ``run`` sub-command; ``eval compare ...`` the other."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group("eval", cls=_DefaultGroup)
def command() -> None:
    """Evaluate a model, or compare base and tuned.

    \b
      tunesmith eval CONFIG                 the run in the config's output_dir vs its base model
      tunesmith eval compare --base default --tuned runs/x --data test.jsonl

    Reports go to <run dir>/eval (or -o): report.md, report.json, samples.jsonl,
    charts/*.png.
    """


def _print_summary(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=False)
    comparison = report.get("comparison") or {}
    main = report.get("tuned") or report.get("base") or {}
    for name, res in main.items():
        table = Table(title=name, title_justify="left")
        if name in comparison and comparison[name]:
            for col in ("metric", "base", "tuned", "relative change", "better"):
                table.add_column(col, justify="right" if col not in ("metric", "better") else "left")
            for m, r in comparison[name].items():
                rel = r["relative_change_pct"]
                table.add_row(m, _f(r["base"]), _f(r["tuned"]), "–" if rel is None else f"{rel:+.1f}%", r["better"] or "")
        else:
            table.add_column("metric")
            table.add_column("value", justify="right")
            for m, v in res.get("metrics", {}).items():
                table.add_row(m, _f(v))
        console.print(table)
    console.print(f"report: {report['paths']['markdown']}")


def _f(v: Any) -> str:
    from tunesmith.core.evaluation import _fmt

    return _fmt(v)


def _brief(report: dict) -> dict:
    return {k: report[k] for k in ("meta", "base", "tuned", "comparison", "paths", "metrics", "eval_dir") if k in report}


@command.command("run")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--run-dir", type=click.Path(file_okay=False), help="The run to evaluate (default: the config's output_dir).")
@click.option("--no-base", is_flag=True, help="Evaluate the tuned model only, without the base-model comparison.")
@click.option("-o", "--output", type=click.Path(file_okay=False), help="Report folder (default: <run dir>/eval).")
@set_option
@json_option
def run_cmd(config: str, run_dir: str | None, no_base: bool, output: str | None, overrides: tuple[str, ...], as_json: bool) -> None:
    """Evaluate the run of CONFIG (tuned vs base), or the base model before training."""
    from tunesmith.cli import get_state
    from tunesmith.core.evaluation import evaluate_run

    from tunesmith.cli import attach_run_log
    from tunesmith.commands.train import preflight
    from tunesmith.core.rundir import RunDir

    cfg = load_cli_config(config, overrides)
    regs = get_state().registries(tuple(cfg.plugins.disable))
    preflight(cfg, regs, "eval", run_dir=run_dir)  # data and paths before any model loads
    attach_run_log(Path(run_dir) if run_dir else RunDir.for_config(cfg).root)
    report = evaluate_run(cfg, regs, Path(run_dir) if run_dir else None, compare_base=not no_base, out_dir=output)
    if as_json:
        echo_json(_brief(report))
    else:
        _print_summary(report)


@command.command("compare")
@click.option("--base", "base_spec", required=True, help="Base model: default, source:NAME, a model folder, a run dir or a .gguf.")
@click.option("--tuned", "tuned_spec", required=True, help="Tuned model: a run directory, its final/ folder, a model folder or a .gguf.")
@click.option("--data", type=click.Path(exists=True), help="Evaluation set for perplexity and generation (prompt/expected or chat rows).")
@click.option("--general-data", type=click.Path(exists=True), help="General corpus for the forgetting check (default: built-in).")
@click.option("-e", "--evaluator", "evaluators", multiple=True, help="Evaluator to run (repeatable; default: perplexity, generation, forgetting).")
@click.option("--config", type=click.Path(exists=True, dir_okay=False), help="Take the evaluators and their options from this config.")
@click.option("--limit", type=int, help="Evaluate at most this many rows per evaluator.")
@click.option("--max-new-tokens", type=int, help="Greedy decoding length for generation (default 256).")
@click.option("--batch-size", type=int, help="Generation batch size (default 1: per-request latency).")
@click.option("-o", "--output", type=click.Path(file_okay=False), required=True, help="Report folder.")
@json_option
def compare_cmd(
    base_spec: str,
    tuned_spec: str,
    data: str | None,
    general_data: str | None,
    evaluators: tuple[str, ...],
    config: str | None,
    limit: int | None,
    max_new_tokens: int | None,
    batch_size: int | None,
    output: str,
    as_json: bool,
) -> None:
    """Run the same evaluators, with the same decoding, on two models; report side by side."""
    from tunesmith.cli import get_state
    from tunesmith.core.context import RunContext
    from tunesmith.core.evaluation import compare_models, default_evaluators, evaluator_specs, load_any_model, specs_from_names

    regs = get_state().registries()
    cfg = load_cli_config(config) if config else None
    if cfg is not None and not evaluators and cfg.evaluation:
        specs = evaluator_specs(cfg, regs)
        specs = [(n, _override(o, data, general_data, limit, max_new_tokens, batch_size, n)) for n, o in specs]
    else:
        names = list(evaluators or default_evaluators(regs))
        specs = specs_from_names(names, regs)
        specs = [(n, _override(o, data, general_data, limit, max_new_tokens, batch_size, n)) for n, o in specs]
    for name, opts in specs:
        if opts is not None and "path" in type(opts).model_fields and getattr(opts, "path") is None and name != "forgetting":
            raise click.UsageError(f"the {name} evaluator needs data: pass --data FILE")
    click.echo(f"loading base model: {base_spec}", err=True)
    base = load_any_model(base_spec, regs)
    click.echo(f"loading tuned model: {tuned_spec}", err=True)
    tuned = load_any_model(tuned_spec, regs)
    ctx = RunContext(config=cfg, registries=regs)
    report = compare_models(
        base[:2], tuned[:2], specs, regs, output, context=ctx, meta={"base_model": base[2], "tuned_model": tuned[2]}
    )
    if as_json:
        echo_json(_brief(report))
    else:
        _print_summary(report)


def _override(opts: Any, data, general_data, limit, max_new_tokens, batch_size, name: str) -> Any:
    if opts is None:
        return None
    fields = type(opts).model_fields
    upd: dict[str, Any] = {}
    if name == "forgetting":
        if general_data:
            upd["path"] = str(Path(general_data).resolve())
    elif data and "path" in fields:
        upd["path"] = str(Path(data).resolve())
    if limit is not None and "limit" in fields:
        upd["limit"] = limit
    if max_new_tokens is not None and "max_new_tokens" in fields:
        upd["max_new_tokens"] = max_new_tokens
    if batch_size is not None and name == "generation" and "batch_size" in fields:
        upd["batch_size"] = batch_size
    return type(opts).model_validate({**opts.model_dump(), **upd}) if upd else opts
