"""``tunesmith human-eval export|import|score|serve``: blinded human evaluation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from tunesmith.commands._common import echo_json, json_option


@click.group("human-eval")
def command() -> None:
    """Blinded human-evaluation sheets, a local rating page and agreement statistics.

    \b
      tunesmith human-eval export --from-eval runs/x/eval -n 30 -o he/
      tunesmith human-eval serve he/sheet.jsonl          # raters score in the browser
      tunesmith human-eval score he/sheet.answers.jsonl filled.csv --key he/key.json
    """


def _pairs(values: tuple[str, ...], opt: str) -> dict[str, str]:
    out = {}
    for v in values:
        if "=" not in v:
            raise click.BadParameter(f"expected NAME=PATH, got '{v}'", param_hint=opt)
        k, p = v.split("=", 1)
        out[k.strip()] = p.strip()
    return out


def _read_outputs(path: str) -> list[str]:
    from tunesmith.core.errors import DataError

    rows = []
    for i, ln in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not ln.strip():
            continue
        r = json.loads(ln)
        text = next((r[k] for k in ("output", "completion", "response", "text", "tuned") if isinstance(r, dict) and k in r), None)
        if text is None:
            raise DataError("row has no 'output' (or completion/response/text) field", path=path, line=i)
        rows.append(str(text))
    if not rows:
        raise DataError("the file is empty", path=path)
    return rows


@command.command("export")
@click.option("--data", type=click.Path(exists=True, dir_okay=False), help="Prompts (prompt/expected or chat rows).")
@click.option("--model", "models", multiple=True, metavar="NAME=MODEL", help="Generate outputs with this model (default, a run dir, a folder, a .gguf); repeatable.")
@click.option("--outputs", "output_files", multiple=True, metavar="NAME=FILE", help="Take outputs from a JSONL file (one 'output' per prompt, same order); repeatable.")
@click.option("--from-eval", "from_eval", type=click.Path(exists=True, file_okay=False), help="Use an eval report folder's samples (base and tuned).")
@click.option("-n", "n", type=int, help="Number of items (a random sample; default all).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the sample and the blinded order.")
@click.option("--max-new-tokens", type=int, default=256, show_default=True, help="Greedy decoding length when generating.")
@click.option("-o", "--output", type=click.Path(file_okay=False), required=True, help="Folder for sheet.jsonl, sheet.csv and key.json.")
@click.option("--overwrite", is_flag=True, help="Replace an existing sheet.")
@json_option
def export_cmd(data, models, output_files, from_eval, n, seed, max_new_tokens, output, overwrite, as_json) -> None:
    """Export a blinded rating sheet (CSV and JSONL) and its unblinding key."""
    from tunesmith.human_eval.sheets import check_sheet_dir, export_sheet

    check_sheet_dir(output, overwrite=overwrite)  # before any generation
    items: list[dict] = []
    outputs: dict[str, list[str]] = {}
    if from_eval:
        samples = [json.loads(x) for x in (Path(from_eval) / "samples.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
        samples = [s for s in samples if s.get("evaluator", "generation") == "generation"]
        if not samples:
            raise click.UsageError(f"{from_eval}/samples.jsonl has no generation samples")
        items = [{"prompt": s["prompt"], "reference": s.get("expected")} for s in samples]
        for variant in ("base", "tuned"):
            if all(s.get(variant) is not None for s in samples):
                outputs[variant] = [s[variant] for s in samples]
    if data:
        from tunesmith.core.evalset import load_eval_rows

        rows = load_eval_rows(data, need="prompt")
        items = [{"prompt": r.prompt_text, "reference": r.expected} for r in rows]
        for name, path in _pairs(output_files, "--outputs").items():
            outputs[name] = _read_outputs(path)
        gen_models = _pairs(models, "--model")
        if gen_models:
            from tunesmith.cli import get_state
            from tunesmith.core.evalset import generate, progress_bar
            from tunesmith.core.evaluation import load_any_model

            regs = get_state().registries()
            for name, spec in gen_models.items():
                model, tok, _ = load_any_model(spec, regs)
                bar = progress_bar(len(rows), f"generating {name}")
                gens = generate(model, tok, rows, max_new_tokens=max_new_tokens, progress=bar.update)
                bar.close()
                outputs[name] = [g.text for g in gens]
                del model
    elif models or output_files:
        raise click.UsageError("--model and --outputs need --data (the prompts)")
    if not items:
        raise click.UsageError("give --data with --model/--outputs, or --from-eval")
    paths = export_sheet(items, outputs, output, n=n, seed=seed, overwrite=overwrite)
    if as_json:
        echo_json({k: str(v) for k, v in paths.items()})
    else:
        click.echo(f"sheet: {paths['sheet']} and {paths['csv']}; key (keep from raters): {paths['key']}")


@command.command("import")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--key", required=True, type=click.Path(exists=True, dir_okay=False), help="The key.json written by export.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the unblinded ratings as JSONL.")
@json_option
def import_cmd(files, key, output, as_json) -> None:
    """Import filled sheets (CSV/JSONL) or rating-page answers and unblind them."""
    from tunesmith.human_eval.sheets import import_ratings, ratings_as_rows
    from tunesmith.core.io import atomic_write_jsonl

    ratings = import_ratings(files, key)
    rows = ratings_as_rows(ratings)
    if output:
        atomic_write_jsonl(output, rows)
    if as_json:
        echo_json(rows)
    else:
        click.echo(f"{len(rows)} ratings from {len({r['rater'] for r in rows})} rater(s)" + (f" -> {output}" if output else ""))


@command.command("score")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--key", required=True, type=click.Path(exists=True, dir_okay=False), help="The key.json written by export.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the summary (.json, or .md for Markdown).")
@json_option
def score_cmd(files, key, output, as_json) -> None:
    """Mean scores per model and criterion, and Krippendorff's alpha (ordinal, interval)."""
    from tunesmith.human_eval.sheets import import_ratings, render_score_markdown, score
    from tunesmith.core.io import atomic_write_json, atomic_write_text

    summary = score(import_ratings(files, key))
    md = render_score_markdown(summary)
    if output:
        if output.endswith(".md"):
            atomic_write_text(output, md)
        else:
            atomic_write_json(output, summary)
    if as_json:
        echo_json(summary)
    else:
        click.echo(md)


@command.command("serve")
@click.argument("sheet", type=click.Path(exists=True, dir_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on (keep it local).")
@click.option("--port", default=8765, show_default=True, type=int)
@click.option("--answers", type=click.Path(dir_okay=False), help="Answers file (default: SHEET.answers.jsonl beside the sheet).")
def serve_cmd(sheet, host, port, answers) -> None:
    """Serve a rating page for SHEET: one blinded item at a time, every answer saved at once."""
    from tunesmith.human_eval.server import default_answers_path, serve_sheet

    click.echo(f"rating page: http://{host}:{port}/  (answers: {answers or default_answers_path(sheet)}; Ctrl+C to stop)")
    serve_sheet(sheet, host=host, port=port, answers=answers)
