"""Running evaluators, comparing base and tuned models, writing the report.

Public functions:

* :func:`evaluator_specs` - the ``(name, options)`` pairs of a config's ``evaluation:``
  list (perplexity, generation and forgetting when it is empty);
* :func:`run_evaluators` - every evaluator on one model;
* :func:`compare` - base vs tuned results side by side with the relative change;
* :func:`compare_models` - run the same evaluators with the same decoding on a base
  and a tuned model and write the report;
* :func:`write_report` - ``report.md``, ``report.json``, ``samples.jsonl`` and PNG
  charts (base vs tuned per metric, loss curves from ``metrics.jsonl``);
* :func:`evaluate_run` - the pipeline's evaluate stage for a run directory.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any, Iterator

from tunesmith.core.context import RunContext
from tunesmith.core.errors import ConfigError, TunesmithError
from tunesmith.core.io import atomic_write_json, atomic_write_jsonl, atomic_write_text
from tunesmith.core.registry import member
from tunesmith.core.rundir import RunDir



def default_evaluators(registries: Any) -> list[str]:
    """The evaluators that run when the config lists none: those whose
    ``default_order`` is set, in that order."""
    chain = [(member(ev, "evaluators", "default_order"), name) for name, ev in registries.evaluators.items()]
    return [name for order, name in sorted(c for c in chain if c[0] is not None)]


# --------------------------------------------------------------------------- specs
def evaluator_specs(cfg: Any, registries: Any) -> list[tuple[str, Any]]:
    """(name, validated options) per configured evaluator; the defaults when none is configured."""
    out: list[tuple[str, Any]] = []
    sections = list(getattr(cfg, "evaluation", None) or [])
    if sections:
        for i, spec in enumerate(sections):
            ev = registries.evaluators.get(spec.name)
            opts = spec._options
            if opts is None and getattr(ev, "Options", None) is not None:
                opts = _validate_options(ev, spec.plugin_fields(), f"evaluation.{i}")
            out.append((spec.name, opts))
        return out
    for name in default_evaluators(registries):
        ev = registries.evaluators.get(name)
        out.append((name, ev.Options() if getattr(ev, "Options", None) is not None else None))
    return out


def _validate_options(ev: Any, data: dict, key: str) -> Any:
    from pydantic import ValidationError

    try:
        return ev.Options.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise ConfigError(first["msg"], key=f"{key}.{loc}") from None


def specs_from_names(names: list[str], registries: Any, overrides: dict[str, dict] | None = None) -> list[tuple[str, Any]]:
    """(name, options) for evaluator names, with per-evaluator option overrides."""
    out = []
    for name in names:
        ev = registries.evaluators.get(name)
        opts_model = getattr(ev, "Options", None)
        data = dict((overrides or {}).get(name) or {})
        if opts_model is not None:
            data = {k: v for k, v in data.items() if k in opts_model.model_fields}
            out.append((name, _validate_options(ev, data, name)))
        else:
            out.append((name, None))
    return out


# --------------------------------------------------------------------------- running
def run_evaluators(
    model: Any,
    tokenizer: Any,
    specs: list[tuple[str, Any]],
    registries: Any,
    *,
    context: RunContext | None = None,
    variant: str = "tuned",
    base_results: dict | None = None,
) -> dict[str, dict]:
    """Each evaluator's result on one model; ``after_evaluation`` fires for each."""
    ctx = context or RunContext(registries=registries)
    ctx.model, ctx.tokenizer = model, tokenizer
    ctx.state["variant"] = variant
    ctx.state["base_results"] = base_results or {}
    results: dict[str, dict] = {}
    for name, options in specs:
        ev = registries.evaluators.get(name)
        t0 = time.perf_counter()
        res = ev.evaluate(model, tokenizer, options, ctx)
        if not isinstance(res, dict):
            raise TunesmithError(f"evaluator '{name}' returned {type(res).__name__}, expected a dict with 'metrics'")
        res = dict(res)
        res.setdefault("metrics", {})
        res["seconds"] = round(time.perf_counter() - t0, 3)
        results[name] = res
        ctx.emit("after_evaluation", evaluator=name, results=res)
    ctx.state.pop("base_results", None)
    return results


def direction(evaluator: Any, metric: str) -> str | None:
    """``"lower"`` or ``"higher"`` is better for ``metric``, as its evaluator declares
    (``lower_is_better``; everything else higher), or None for the metrics it calls
    ``neutral_metrics`` (counts: shown, never called better or worse). A metric of
    an evaluator that is not installed any more gets no verdict."""
    if evaluator is None:
        return None
    if metric in (member(evaluator, "evaluators", "neutral_metrics") or ()):
        return None
    return "lower" if metric in (member(evaluator, "evaluators", "lower_is_better") or ()) else "higher"


def compare(base: dict[str, dict], tuned: dict[str, dict], registries: Any = None) -> dict[str, dict]:
    """Per evaluator and metric: base, tuned, change, relative change (%) and which is better."""
    out: dict[str, dict] = {}
    for name in tuned:
        if name not in base:
            continue
        ev = registries.evaluators.get(name) if registries is not None and name in registries.evaluators else None
        rows: dict[str, dict] = {}
        bm, tm = base[name].get("metrics", {}), tuned[name].get("metrics", {})
        for metric, tv in tm.items():
            bv = bm.get(metric)
            if not _is_number(tv) or not _is_number(bv):
                continue
            change = tv - bv
            rel = (change / abs(bv) * 100.0) if bv not in (0, 0.0) and not math.isnan(bv) else None
            better = None
            way = direction(ev, metric)
            if way is not None and not math.isnan(change):
                if change == 0:
                    better = "same"
                else:
                    better = "tuned" if (change < 0) == (way == "lower") else "base"
            rows[metric] = {"base": bv, "tuned": tv, "change": change, "relative_change_pct": rel, "better": better}
        out[name] = rows
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def side_by_side(base: dict[str, dict], tuned: dict[str, dict]) -> list[dict]:
    """Samples of both models on the same rows: prompt, expected, base, tuned."""
    rows: list[dict] = []
    for name, res in tuned.items():
        tsamples = res.get("samples") or []
        bsamples = (base.get(name) or {}).get("samples") or []
        for i, t in enumerate(tsamples):
            b = bsamples[i] if i < len(bsamples) else {}
            rows.append(
                {
                    "evaluator": name,
                    "line": t.get("line"),
                    "prompt": t.get("prompt"),
                    "expected": t.get("expected"),
                    "base": b.get("output"),
                    "tuned": t.get("output"),
                    "base_latency_ms": b.get("latency_ms"),
                    "tuned_latency_ms": t.get("latency_ms"),
                }
            )
    return rows


@contextlib.contextmanager
def adapters_disabled(model: Any) -> Iterator[Any]:
    """The base model inside a PEFT model: the same weights with the adapters off."""
    with model.disable_adapter():
        yield model


def is_peft_model(model: Any) -> bool:
    return hasattr(model, "disable_adapter") and bool(getattr(model, "peft_config", None))


def compare_models(
    base: tuple[Any, Any] | None,
    tuned: tuple[Any, Any] | None,
    specs: list[tuple[str, Any]],
    registries: Any,
    out_dir: str | Path,
    *,
    context: RunContext | None = None,
    base_from_adapter: bool = False,
    metrics_path: str | Path | None = None,
    meta: dict | None = None,
) -> dict:
    """Run ``specs`` on the base and the tuned model (either may be None) and write the report.

    ``base_from_adapter`` evaluates the base as the tuned PEFT model with its
    adapters switched off (no second copy of the weights in memory).
    """
    ctx = context or RunContext(registries=registries)
    base_res: dict[str, dict] = {}
    tuned_res: dict[str, dict] = {}
    t0 = time.perf_counter()
    if base_from_adapter:
        if tuned is None or not is_peft_model(tuned[0]):
            raise TunesmithError("base_from_adapter needs a tuned PEFT model")
        with adapters_disabled(tuned[0]):
            base_res = run_evaluators(tuned[0], tuned[1], specs, registries, context=ctx, variant="base")
    elif base is not None:
        base_res = run_evaluators(base[0], base[1], specs, registries, context=ctx, variant="base")
    if tuned is not None:
        tuned_res = run_evaluators(tuned[0], tuned[1], specs, registries, context=ctx, variant="tuned", base_results=base_res)
    comparison = compare(base_res, tuned_res, registries) if base_res and tuned_res else {}
    report = {
        "meta": {**(meta or {}), "evaluators": [n for n, _ in specs], "seconds": round(time.perf_counter() - t0, 2)},
        "options": {n: (o.model_dump(mode="json") if o is not None else None) for n, o in specs},
        "base": _strip_samples(base_res),
        "tuned": _strip_samples(tuned_res),
        "comparison": comparison,
    }
    samples = side_by_side(base_res, tuned_res) if tuned_res else side_by_side({}, base_res)
    paths = write_report(out_dir, report, samples, metrics_path=metrics_path)
    report["paths"] = {k: str(v) for k, v in paths.items()}
    report["samples"] = samples
    return report


def _strip_samples(results: dict[str, dict]) -> dict[str, dict]:
    return {n: {k: v for k, v in r.items() if k != "samples"} for n, r in results.items()}


# --------------------------------------------------------------------------- the report
def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        if abs(v) >= 1000:
            return f"{v:,.1f}"
        return f"{v:.4g}"
    return str(v)


def _cell(text: Any, limit: int = 300) -> str:
    s = "" if text is None else str(text)
    if len(s) > limit:
        s = s[: limit - 1] + "…"
    return s.replace("|", "\\|").replace("\r", " ").replace("\n", "<br>")


def read_metrics_log(path: str | Path) -> list[dict]:
    """Rows of a training ``metrics.jsonl`` (broken lines are skipped)."""
    p = Path(path)
    rows = []
    if not p.exists():
        return rows
    for ln in p.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            r = json.loads(ln)
            if isinstance(r, dict):
                rows.append(r)
    return rows


def loss_series(rows: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """(step, value) series of every loss-like key in a metrics log."""
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        step = r.get("step", r.get("global_step"))
        if not _is_number(step):
            continue
        for k, v in r.items():
            if "loss" in k and _is_number(v) and math.isfinite(v):
                series.setdefault(k, []).append((float(step), float(v)))
    return series


def plot_loss(rows: list[dict], out: Path) -> Path | None:
    series = loss_series(rows)
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, pts in sorted(series.items()):
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Training and evaluation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save_fig(fig, out)
    plt.close(fig)
    return out


def _save_fig(fig: Any, out: Path) -> None:
    import io

    from tunesmith.core.io import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(out, buf.getvalue())


def plot_comparison(name: str, rows: dict[str, dict], out: Path) -> Path | None:
    """One PNG per evaluator: a pair of bars (base, tuned) per metric."""
    # neutral metrics (counts: no verdict) are not plotted
    metrics = [m for m, r in rows.items() if r.get("better") is not None and all(_is_number(r[k]) and math.isfinite(r[k]) for k in ("base", "tuned"))]
    if not metrics:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.4 * cols, 2.8 * nrows), squeeze=False)
    for ax, m in zip(axes.flat, metrics):
        r = rows[m]
        bars = ax.bar(["base", "tuned"], [r["base"], r["tuned"]], color=["#8c8c8c", "#2b7bba"])
        ax.bar_label(bars, labels=[_fmt(r["base"]), _fmt(r["tuned"])], fontsize=8)
        rel = r.get("relative_change_pct")
        ax.set_title(m + (f" ({rel:+.1f}%)" if rel is not None else ""), fontsize=9)
        ax.tick_params(labelsize=8)
        ax.margins(y=0.2)
        top = max(r["base"], r["tuned"])
        if min(r["base"], r["tuned"]) >= 0:
            ax.set_ylim(0, top * 1.2 if top > 0 else 1)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    fig.suptitle(f"{name}: base vs tuned", fontsize=11)
    fig.tight_layout()
    _save_fig(fig, out)
    plt.close(fig)
    return out


def write_report(out_dir: str | Path, report: dict, samples: list[dict], *, metrics_path: str | Path | None = None, max_samples: int = 10) -> dict[str, Path]:
    """Write report.json, report.md, samples.jsonl and charts/*.png into ``out_dir``."""
    out = Path(out_dir)
    charts = out / "charts"
    paths: dict[str, Path] = {}
    chart_files: dict[str, Path] = {}
    for name, rows in (report.get("comparison") or {}).items():
        p = plot_comparison(name, rows, charts / f"{name}.png")
        if p:
            chart_files[name] = p
    loss_png = None
    if metrics_path is not None:
        loss_png = plot_loss(read_metrics_log(metrics_path), charts / "loss.png")
        if loss_png:
            chart_files["loss"] = loss_png
    report.setdefault("charts", {}).update({k: str(v.relative_to(out)) for k, v in chart_files.items()})
    paths["samples"] = atomic_write_jsonl(out / "samples.jsonl", samples)
    paths["json"] = atomic_write_json(out / "report.json", report)
    paths["markdown"] = atomic_write_text(out / "report.md", render_markdown(report, samples, max_samples=max_samples))
    paths.update({f"chart_{k}": v for k, v in chart_files.items()})
    return paths


def render_markdown(report: dict, samples: list[dict], *, max_samples: int = 10) -> str:
    meta = report.get("meta", {})
    lines = ["# Evaluation report", ""]
    for k in ("base_model", "tuned_model", "run_dir"):
        if meta.get(k):
            lines.append(f"- **{k.replace('_', ' ')}**: `{meta[k]}`")
    lines.append(f"- **evaluators**: {', '.join(meta.get('evaluators', []))}")
    lines.append(f"- **time**: {meta.get('seconds', 0):.1f} s")
    lines.append("")
    comparison = report.get("comparison") or {}
    single = report.get("tuned") or report.get("base") or {}
    single_label = "tuned" if report.get("tuned") else "base"
    charts = report.get("charts", {})
    for name in meta.get("evaluators", []):
        lines += [f"## {name}", ""]
        res = (report.get("tuned") or {}).get(name) or (report.get("base") or {}).get(name) or {}
        if res.get("data"):
            lines.append(f"Data: `{res['data']}`" + (f"; baseline: {res['baseline']}" if res.get("baseline") else ""))
            lines.append("")
        if name in comparison and comparison[name]:
            lines += ["| metric | base | tuned | change | relative change | better |", "| --- | ---: | ---: | ---: | ---: | --- |"]
            for m, r in comparison[name].items():
                rel = r["relative_change_pct"]
                lines.append(
                    f"| {m} | {_fmt(r['base'])} | {_fmt(r['tuned'])} | {r['change']:+.4g} | "
                    f"{'–' if rel is None else f'{rel:+.1f}%'} | {r['better'] or ''} |"
                )
        elif name in single:
            lines += [f"| metric | {single_label} |", "| --- | ---: |"]
            for m, v in single[name].get("metrics", {}).items():
                lines.append(f"| {m} | {_fmt(v)} |")
        if name in charts:
            lines += ["", f"![{name}: base vs tuned]({charts[name]})"]
        if name == "forgetting":
            fm = ((report.get("tuned") or {}).get(name) or {}).get("metrics", {})
            if "forgetting_pct" in fm:
                pct = fm["forgetting_pct"]
                verdict = "rose" if pct > 0 else "fell"
                lines += [
                    "",
                    f"General-text perplexity {verdict} by {abs(pct):.1f}% "
                    f"({_fmt(fm['general_perplexity_base'])} → {_fmt(fm['general_perplexity'])}): "
                    + ("the fine-tune cost some general ability." if pct > 5 else "little or no forgetting."),
                ]
        lines.append("")
    if "loss" in charts:
        lines += ["## Training curves", "", f"![loss]({charts['loss']})", ""]
    if samples:
        both = any(s.get("base") is not None for s in samples) and any(s.get("tuned") is not None for s in samples)
        lines += [f"## Samples (first {min(max_samples, len(samples))} of {len(samples)}, all in samples.jsonl)", ""]
        if both:
            lines += ["| # | prompt | expected | base | tuned |", "| --- | --- | --- | --- | --- |"]
            for i, s in enumerate(samples[:max_samples], 1):
                lines.append(f"| {i} | {_cell(s['prompt'])} | {_cell(s['expected'])} | {_cell(s['base'])} | {_cell(s['tuned'])} |")
        else:
            lines += ["| # | prompt | expected | output |", "| --- | --- | --- | --- |"]
            for i, s in enumerate(samples[:max_samples], 1):
                out = s.get("tuned") if s.get("tuned") is not None else s.get("base")
                lines.append(f"| {i} | {_cell(s['prompt'])} | {_cell(s['expected'])} | {_cell(out)} |")
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the pipeline stage
def evaluate_run(
    cfg: Any,
    registries: Any,
    run_dir: str | Path | RunDir | None = None,
    *,
    compare_base: bool = True,
    specs: list[tuple[str, Any]] | None = None,
    out_dir: str | Path | None = None,
) -> dict:
    """Evaluate a run: the tuned model in ``run_dir/final`` against the base model.

    With no ``final/`` yet, the base model alone is evaluated (a baseline). Writes
    ``run_dir/eval/`` (report.md, report.json, samples.jsonl, charts/) and returns
    the report dict, with ``metrics`` the tuned (or base) model's metrics per evaluator.
    """
    from tunesmith.core import models

    rd = run_dir if isinstance(run_dir, RunDir) else (RunDir(Path(run_dir)) if run_dir is not None else RunDir.for_config(cfg))
    specs = specs if specs is not None else evaluator_specs(cfg, registries)
    ctx = RunContext(config=cfg, run_dir=rd.root, registries=registries)
    tuned = None
    meta: dict[str, Any] = {"run_dir": str(rd.root), "base_model": f"model.source={cfg.model.source}"}
    trained = (rd.final_dir / models.INFO_FILE).exists()
    if trained:
        model, tok, info = models.load_trained(rd.root, registries=registries)
        tuned = (model, tok)
        meta["tuned_model"] = str(rd.final_dir)
        meta["peft"] = (info.get("peft") or {}).get("method")
    base = None
    from_adapter = False
    if compare_base or tuned is None:
        if tuned is not None and is_peft_model(tuned[0]):
            from_adapter = True
            meta["base_model"] += " (the tuned model with its adapters disabled)"
        else:
            base = models.load_model_and_tokenizer(cfg, registries, dtype=_base_dtype(cfg, registries, tuned, info if trained else None))
    ctx.state["base_model"], ctx.state["base_tokenizer"] = (base if base else (None, None))
    report = compare_models(
        base, tuned, specs, registries, Path(out_dir) if out_dir else rd.eval_dir, context=ctx, base_from_adapter=from_adapter,
        metrics_path=rd.metrics_path, meta=meta,
    )
    main = report["tuned"] or report["base"]
    report["metrics"] = {n: r.get("metrics", {}) for n, r in main.items()}
    report["eval_dir"] = str(Path(out_dir) if out_dir else rd.eval_dir)
    return report


def _base_dtype(cfg: Any, registries: Any, tuned: Any, info: dict | None) -> Any:
    """The dtype a separately loaded base model is evaluated in: the tuned model's
    (both decode the same way), else bf16 where ``training.precision`` would train
    in bf16 on this machine (native bf16 inference), else the config's ``model.dtype``."""
    from tunesmith.core.models import pick_dtype
    from tunesmith.core.precision import resolve_precision

    if getattr(cfg.model, "dtype", "auto") != "auto":
        return None
    if tuned is not None:
        dt = next(tuned[0].parameters()).dtype
        return dt if dt.is_floating_point else None
    if info is None and resolve_precision(cfg, registries, quiet=True).store_base_bf16:
        return pick_dtype("bfloat16")
    return None


def load_any_model(spec: str, registries: Any) -> tuple[Any, Any, str]:
    """(model, tokenizer, description) from ``default`` / ``source:NAME``, a run
    directory or its ``final/`` folder, a transformers folder or a ``.gguf`` file."""
    from tunesmith.core import models
    from tunesmith.core.config import ModelSection

    if spec == "default" or spec.startswith("source:"):
        src = "default" if spec == "default" else spec.split(":", 1)[1]
        model, tok = models.load_model_and_tokenizer(ModelSection(source=src), registries)
        return model, tok, f"model source '{src}'"
    p = Path(spec).expanduser()
    if (p / models.INFO_FILE).exists() or (p / "final" / models.INFO_FILE).exists():
        model, tok, info = models.load_trained(p, registries=registries)
        return model, tok, f"trained run {p}"
    if (p / "config.json").exists():
        model, tok = models.load_from_dir(p)
        return model, tok, f"model folder {p}"
    if p.suffix == ".gguf" and p.exists():
        model, tok = models.load_from_dir(models.convert_gguf(p))
        return model, tok, f"GGUF {p}"
    raise TunesmithError(
        f"cannot load a model from '{spec}'",
        hint="give 'default', 'source:NAME', a run directory, a transformers folder or a .gguf file",
    )
