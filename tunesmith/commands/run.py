"""``tunesmith run CONFIG``: data -> train -> evaluate -> export -> register, then a summary."""

from __future__ import annotations

import click

from tunesmith.commands._common import echo_json, json_option, set_option


@click.command("run")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--from", "from_stage", metavar="STAGE",
              help="Start at this stage (data, train, evaluate, export, register), reusing the earlier stages' outputs.")
@click.option("--until", metavar="STAGE", help="Stop after this stage.")
@click.option("--resume", is_flag=True, help="Start from the first stage that has not completed.")
@click.option("-o", "--output", type=click.Path(file_okay=False), help="Run directory (overrides output_dir).")
@set_option
@json_option
def command(config: str, from_stage: str | None, until: str | None, resume: bool, output: str | None,
            overrides: tuple[str, ...], as_json: bool) -> None:
    """Run the whole pipeline from one config and print what it did.

    Example: tunesmith run examples/quickstart.yaml --set training.max_steps=20

    A failed stage can be restarted with --from STAGE; the stages before it are
    reused from the run directory (see pipeline.json there).
    """
    from tunesmith.commands._common import load_cli_config
    from tunesmith.core.pipeline import run_pipeline, stage_name

    if output:
        overrides = (*overrides, f"output_dir={output}")
    if from_stage:
        stage_name(from_stage)
    if until:
        stage_name(until)
    cfg = load_cli_config(config, overrides)
    from tunesmith.cli import get_state

    regs = get_state().registries(tuple(cfg.plugins.disable))
    from tunesmith.cli import attach_run_log
    from tunesmith.commands.train import preflight
    from tunesmith.core.rundir import RunDir

    start = stage_name(from_stage) if from_stage else "data"
    if from_stage or resume:  # the stage order first: a later start needs the earlier stages done
        from tunesmith.core.pipeline import plan_stages, read_state

        plan_stages(read_state(RunDir.for_config(cfg).root), from_stage=from_stage, resume=resume, until=until)
    # data and paths before any model loads (a run that starts later reuses its prepared data)
    preflight(cfg, regs, {"data": "run", "train": "train", "evaluate": "eval"}.get(start, "export"))
    attach_run_log(RunDir.for_config(cfg).root)
    console = _console(as_json)

    def on_stage(stage: str, event: str, info: dict) -> None:
        if console is None:
            return
        if event == "start":
            console.rule(f"[bold]{stage}")
        elif event == "done":
            console.print(f"[green]✓[/green] {stage} done in {info.get('seconds', 0):.1f}s")
        else:
            console.print(f"[red]✗[/red] {stage} failed after {info.get('seconds', 0):.1f}s: {info.get('error')}")

    import contextlib
    import sys

    # with --json, stdout carries the summary only: what the stages print goes to stderr
    redirect = contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext()
    with redirect:
        summary = run_pipeline(cfg, regs, from_stage=from_stage, resume=resume, until=until,
                               progress=not as_json, on_stage=on_stage)
    if as_json:
        echo_json(summary)
    else:
        print_summary(summary, console)


def _console(as_json: bool):  # type: ignore[no-untyped-def]
    if as_json:
        return None
    from rich.console import Console

    return Console(stderr=False)


def _f(v: object, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


#: metrics shown in the summary table (all are in eval/report.md)
HEADLINE = ("exact_match", "normalized_exact_match", "accuracy", "macro_f1", "perplexity", "rougeL", "bleu",
            "latency_mean_ms", "forgetting", "relative_increase")


def print_summary(s: dict, console) -> None:  # type: ignore[no-untyped-def]
    from rich.panel import Panel
    from rich.table import Table

    lines = []
    d = s.get("data") or {}
    if d.get("rows_in") is not None:
        by = ", ".join(f"{k} {v}" for k, v in (d.get("rejected_by") or {}).items())
        splits = ", ".join(f"{k} {v}" for k, v in (d.get("splits") or {}).items())
        lines.append(f"[bold]data[/bold]      {d['rows_in']} rows in, {d.get('kept')} kept, {d.get('rejected')} rejected"
                     + (f" ({by})" if by else "") + (f"; split {splits}" if splits else ""))
    t = s.get("train") or {}
    if t.get("steps") is not None:
        loss = f"train loss {_f(t.get('last_loss'))} (mean {_f(t.get('loss'))})" if t.get("last_loss") is not None \
            else f"mean train loss {_f(t.get('loss'))}"
        lines.append(f"[bold]training[/bold]  {t['steps']} steps in {_f(t.get('seconds'), 3)}s, {loss}"
                     + (f", eval loss {_f(t.get('eval_loss'))}" if t.get("eval_loss") is not None else ""))
    reg = s.get("registry") or {}
    if reg.get("version") is not None:
        lines.append(f"[bold]registry[/bold]  {reg.get('name', '')} version {reg['version']} ({reg.get('stage', 'registered')})")
    elif reg.get("skipped"):
        lines.append(f"[bold]registry[/bold]  skipped: {reg['skipped']}")
    console.print(Panel("\n".join(lines) or "nothing ran", title=f"tunesmith run: {s.get('name')}", expand=False))
    rows = [r for r in s.get("metrics") or [] if r["metric"] in HEADLINE]
    if rows:
        table = Table(title="base vs tuned", header_style="bold")
        for col in ("evaluator", "metric", "base", "tuned", "change"):
            table.add_column(col, justify="left" if col in ("evaluator", "metric") else "right")
        for r in rows:
            ch, b, tu = r.get("change"), r.get("base"), r.get("tuned")
            if ch is not None and abs(ch) < 10:
                shown = f"{ch:+.1%}"
            elif b is not None and tu is not None:
                shown = f"{tu - b:+.4g}"  # from zero (or a tiny base) a percentage says nothing
            else:
                shown = "-"
            table.add_row(r["evaluator"], r["metric"], _f(b), _f(tu), shown)
        console.print(table)
    a = s.get("artefacts") or {}
    where = [("eval report", a.get("eval_report")), ("plots", a.get("plots")), ("data report", d.get("report")),
             ("model", a.get("final"))]
    where += [(f"export {k}", v) for k, v in (a.get("exports") or {}).items()]
    for label, path in where:
        if path:
            console.print(f"  {label:<12} {path}")
    console.print(f"  {'summary':<12} {s.get('run_dir')}/summary.json   ({s.get('wall_seconds')}s in stages)")
    for w in s.get("warnings") or []:
        console.print(f"[yellow]warning:[/yellow] {w}")
