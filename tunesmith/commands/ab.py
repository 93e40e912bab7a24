"""``tunesmith ab analyze LOG`` and ``tunesmith ab route``."""

from __future__ import annotations

import click

from tunesmith.commands._common import echo_json, json_option


@click.group("ab")
def command() -> None:
    """A/B tests: deterministic routing by request id, and the analysis of a request log."""


def _variants(s: str) -> list[str]:
    v = [x.strip() for x in s.split(",") if x.strip()]
    if len(v) < 2:
        raise click.BadParameter("give at least two variant names, e.g. A,B", param_hint="--variants")
    return v


@command.command("analyze")
@click.argument("log", type=click.Path(exists=True, dir_okay=False))
@click.option("--alpha", type=float, default=0.05, show_default=True, help="Significance level.")
@click.option("--split", type=float, default=50.0, show_default=True, help="Percent routed to the first variant (rows without 'variant').")
@click.option("--variants", default="A,B", show_default=True, help="Variant names for routing rows by request_id.")
@click.option("--control", help="The control variant (default: the first name in sort order).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the analysis (.json, or .md for Markdown).")
@json_option
def analyze_cmd(log, alpha, split, variants, control, output, as_json) -> None:
    """Per-variant latency (count, mean, p50, p95), Welch's t-test, a two-proportion
    test on 'success', and a verdict. LOG is JSONL: variant or request_id, latency_ms, success."""
    from tunesmith.ab import analyze, read_log, render_markdown
    from tunesmith.core.io import atomic_write_json, atomic_write_text

    result = analyze(read_log(log, split=split, variants=_variants(variants)), alpha=alpha, control=control)
    if output:
        if output.endswith(".md"):
            atomic_write_text(output, render_markdown(result))
        else:
            atomic_write_json(output, result)
    if as_json:
        echo_json(result)
    else:
        click.echo(render_markdown(result))


@command.command("route")
@click.argument("request_ids", nargs=-1, required=True)
@click.option("--split", type=float, default=50.0, show_default=True, help="Percent routed to the first variant.")
@click.option("--variants", default="A,B", show_default=True)
@json_option
def route_cmd(request_ids, split, variants, as_json) -> None:
    """The variant of each request id (MD5 of the id mod 100 against the split)."""
    from tunesmith.ab import route

    v = _variants(variants)
    out = {rid: route(rid, split, v[:2]) for rid in request_ids}
    if as_json:
        echo_json(out)
    else:
        for rid, var in out.items():
            click.echo(f"{rid}\t{var}")
