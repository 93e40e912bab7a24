"""What a sweep reports: the results table, ``results.json``, PNG plots, the best config.

Written into the sweep folder after every run of ``tunesmith sweep``::

    OUT/results.json          every trial: number, state, value, values, steps, seconds, run dir
    OUT/best.yaml             the base config with the best trial's values (paths absolute;
                              output_dir the base config's), ready for ``tunesmith run``
    OUT/best.json             the best trial: value, values, run dir
    OUT/plots/history.png     the value of each trial and the best so far
    OUT/plots/importance.png  how much each key mattered (Optuna's fANOVA importance)
    OUT/plots/intermediate.png  the pruning signal of every trial, per step
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

from tunesmith.core.io import atomic_open, atomic_write_json, atomic_write_text

STATE_NAMES = {"complete": "complete", "pruned": "pruned", "fail": "failed", "running": "running", "waiting": "waiting"}


def trial_rows(study: Any) -> list[dict]:
    rows = []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        state = STATE_NAMES.get(t.state.name.lower(), t.state.name.lower())
        if state == "failed" and t.user_attrs.get("interrupted"):
            state = "interrupted"
        value = t.value if t.value is not None else None
        if state == "pruned" and value is None and t.intermediate_values:
            value = t.intermediate_values[max(t.intermediate_values)]
        rows.append({
            "trial": t.number,
            "state": state,
            "value": value,
            "params": dict(t.params),
            "steps": t.user_attrs.get("steps"),
            "seconds": t.user_attrs.get("seconds"),
            "eval_loss": t.user_attrs.get("eval_loss"),
            "stop_reason": t.user_attrs.get("stop_reason"),
            "run_dir": t.user_attrs.get("run_dir"),
            "retry_of": t.user_attrs.get("retry_of"),
            "error": t.user_attrs.get("error"),
            "intermediate": {int(k): v for k, v in sorted(t.intermediate_values.items())},
        })
    return rows


def best_row(rows: list[dict], direction: str) -> dict | None:
    done = [r for r in rows if r["state"] == "complete" and r["value"] is not None]
    if not done:
        return None
    return (min if direction == "minimize" else max)(done, key=lambda r: r["value"])


def write_report(spec: Any, study: Any, *, wall_s: float | None = None) -> dict:
    out = Path(spec.out_dir)
    rows = trial_rows(study)
    best = best_row(rows, spec.direction)
    plots: dict[str, str] = {}
    notes: list[str] = []
    for name, fn in (("history", plot_history), ("importance", plot_importance), ("intermediate", plot_intermediate)):
        try:
            p = fn(study, rows, spec, out / "plots" / f"{name}.png")
        except Exception as exc:  # noqa: BLE001 - a plot never fails the sweep
            p = None
            notes.append(f"{name} plot: {type(exc).__name__}: {exc}")
        if p is not None:
            plots[name] = str(p)
    report: dict[str, Any] = {
        "sweep": str(out),
        "config": spec.config,
        "study": spec.name,
        "storage": spec.storage_url,
        "metric": spec.metric,
        "direction": spec.direction,
        "trials_wanted": spec.trials,
        "counts": {s: sum(1 for r in rows if r["state"] == s) for s in ("complete", "pruned", "failed", "interrupted",
                                                                         "running", "waiting")},
        "trials": rows,
        "best": best,
        "space": spec.space,
        "plots": plots,
        "notes": notes,
        "trial_seconds": round(sum(r["seconds"] or 0 for r in rows), 1),
    }
    if wall_s is not None:
        report["wall_seconds"] = round(wall_s, 1)
    if best is not None:
        report["best_config"] = str(write_best_config(spec, best, out / "best.yaml"))
        atomic_write_json(out / "best.json", {"metric": spec.metric, "direction": spec.direction, **best})
    atomic_write_json(out / "results.json", report)
    return report


# --------------------------------------------------------------------------- the best config
_PATH_KEYS = ("path", "output_dir", "chat_template")


def _absolutise(node: Any, base: Path) -> Any:
    """Relative paths in a config made absolute (keys ``path``, ``*_path``, ``*_dir``,
    ``output_dir``; a ``chat_template`` that is a file), so the file works from anywhere."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if isinstance(v, str) and (k in _PATH_KEYS or k.endswith(("_path", "_dir"))) and v and not Path(v).expanduser().is_absolute():
                if k != "chat_template" or (base / v).is_file():
                    v = str((base / v).resolve())
            out[k] = _absolutise(v, base)
        return out
    if isinstance(node, list):
        return [_absolutise(x, base) for x in node]
    return node


def write_best_config(spec: Any, best: dict, path: Path) -> Path:
    import yaml

    from tunesmith.core.config import apply_overrides, read_yaml
    from tunesmith.sweep.space import with_params

    # the sweep's base config (as runner.base_data reads it; not imported: runner imports this module)
    data, _ = read_yaml(spec.config)
    if spec.overrides:
        data = apply_overrides(data, spec.overrides)
    base = Path(spec.config).resolve().parent
    data = with_params(copy.deepcopy(data), best["params"])
    data = _absolutise(data, base)
    header = (f"# The best trial of the sweep {spec.out_dir} (trial {best['trial']}: {spec.metric} {best['value']:.6g}).\n"
              f"# Base config: {spec.config}; the sweep's values:\n"
              + "".join(f"#   {k}: {v}\n" for k, v in best["params"].items())
              + f"# Train it in full with: tunesmith run {path}\n")
    return atomic_write_text(path, header + yaml.safe_dump(data, sort_keys=False))


# --------------------------------------------------------------------------- plots
def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    plt = _plt()
    fig.tight_layout()
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100)
    plt.close(fig)
    return path


def plot_history(study: Any, rows: list[dict], spec: Any, path: Path) -> Path | None:
    """Each trial's value (pruned trials at their last reported value) and the best so far."""
    done = [r for r in rows if r["state"] == "complete" and r["value"] is not None]
    pruned = [r for r in rows if r["state"] == "pruned" and r["value"] is not None]
    if not done and not pruned:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    if done:
        ax.plot([r["trial"] for r in done], [r["value"] for r in done], "o", color="tab:blue", label="complete")
        best, xs, ys = None, [], []
        for r in done:
            if best is None or (r["value"] < best if spec.direction == "minimize" else r["value"] > best):
                best = r["value"]
            xs.append(r["trial"])
            ys.append(best)
        ax.step(xs, ys, where="post", color="tab:red", label="best so far")
    if pruned:
        sign = -1.0 if spec.prune_on != spec.metric and spec.direction == "maximize" else 1.0
        ax.plot([r["trial"] for r in pruned], [sign * r["value"] for r in pruned], "x", color="grey", markersize=9,
                label=f"pruned (last {spec.prune_on})")
    ax.set_xlabel("trial")
    ax.set_ylabel(spec.metric)
    ax.set_title(f"optimisation history ({spec.direction} {spec.metric})")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def importances(study: Any) -> dict[str, float]:
    """Optuna's parameter importance over the complete trials (fANOVA; PED-ANOVA when
    fANOVA cannot run); a single key has importance 1."""
    import optuna

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    keys = sorted({k for t in complete for k in t.params})
    if len(complete) < 2 or not keys:
        return {}
    if len(keys) == 1:
        return {keys[0]: 1.0}
    try:
        return dict(optuna.importance.get_param_importances(study))
    except Exception:  # noqa: BLE001 - fANOVA needs enough variation
        return dict(optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.PedAnovaImportanceEvaluator()))


def plot_importance(study: Any, rows: list[dict], spec: Any, path: Path) -> Path | None:
    imp = importances(study)
    if not imp:
        return None
    plt = _plt()
    items = sorted(imp.items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.5 * len(items)))
    ax.barh([k for k, _ in items], [v for _, v in items], color="tab:blue")
    for i, (_, v) in enumerate(items):
        ax.text(v, i, f" {v:.2f}", va="center")
    ax.set_xlim(0, max(1.0, max(v for _, v in items) * 1.15))
    ax.set_xlabel(f"importance for {spec.metric}")
    ax.set_title("parameter importance (fANOVA)")
    return _save(fig, path)


def plot_intermediate(study: Any, rows: list[dict], spec: Any, path: Path) -> Path | None:
    curves = [r for r in rows if r["intermediate"]]
    if not curves:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    sign = -1.0 if spec.prune_on != spec.metric and spec.direction == "maximize" else 1.0
    for r in curves:
        steps = sorted(r["intermediate"])
        style = "--" if r["state"] == "pruned" else "-"
        ax.plot(steps, [sign * r["intermediate"][s] for s in steps], style, marker="o", markersize=3,
                label=f"trial {r['trial']} ({r['state']})")
    ax.set_xlabel("step")
    ax.set_ylabel(spec.prune_on)
    ax.set_title(f"{spec.prune_on} per evaluation (dashed: pruned)")
    ax.grid(alpha=0.3)
    if len(curves) <= 12:
        ax.legend(fontsize=8)
    return _save(fig, path)


# --------------------------------------------------------------------------- the table
def _num(v: Any, fmt: str = ".4g") -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    keys = list(dict.fromkeys(k for r in report["trials"] for k in r["params"]))
    best = (report.get("best") or {}).get("trial")
    table = Table(title=f"{report['sweep']}: {report['direction']} {report['metric']}", title_justify="left")
    for col in ("trial", "state", report["metric"], *keys, "steps", "seconds"):
        table.add_column(col, overflow="fold", justify="right" if col not in ("state",) else "left")
    for r in report["trials"]:
        state = r["state"] + (f" (retry of {r['retry_of']})" if r.get("retry_of") is not None else "")
        if r["state"] == "failed" and r.get("error"):
            state += f": {r['error'][:60]}"
        mark = " *" if r["trial"] == best else ""
        table.add_row(f"{r['trial']}{mark}", state, _num(r["value"]),
                      *[_num(r["params"].get(k)) if isinstance(r["params"].get(k), float) else str(r["params"].get(k, ""))
                        for k in keys],
                      str(r["steps"] if r["steps"] is not None else ""), _num(r["seconds"], ".0f"))
    console = Console()
    console.print(table)
    c = report["counts"]
    console.print(f"{c['complete']} complete, {c['pruned']} pruned, {c['failed']} failed"
                  + (f", {c['interrupted']} interrupted (run again)" if c["interrupted"] else "")
                  + (f"; wall time {report['wall_seconds']:.0f} s" if "wall_seconds" in report else ""))
    if report.get("best"):
        b = report["best"]
        console.print(f"best: trial {b['trial']} {report['metric']} {b['value']:.4f} ("
                      + ", ".join(f"{k}={v}" for k, v in b["params"].items()) + f") -> {report['best_config']}")
    for name, p in report.get("plots", {}).items():
        console.print(f"plot: {name}: {p}")
    for n in report.get("notes", []):
        console.print(f"note: {n}")


# --------------------------------------------------------------------------- register the best trial
def register_best(spec: Any, report: dict, registries: Any = None) -> dict:
    """Put the best trial's model in the base config's registry (its ``registry:`` section and back-end)."""
    from tunesmith.core.config import load_config
    from tunesmith.core.errors import TunesmithError
    from tunesmith.model_registry import open_config_registry
    from tunesmith.model_registry.state import run_metadata

    best = report.get("best")
    if not best:
        raise TunesmithError("no trial completed: nothing to register")
    cfg = load_config(report["best_config"], registries=registries)
    meta = run_metadata(best["run_dir"])
    meta["metadata"].update({"sweep": report["sweep"], "trial": best["trial"], "params": best["params"],
                             "config": report["best_config"]})
    metrics = {spec.metric: best["value"], **{k: v for k, v in meta["metrics"].items() if k != spec.metric}}
    return open_config_registry(cfg, registries).register(
        meta["artifacts"], metrics=metrics, config_hash=cfg.hash(), base_model=meta["base_model"],
        metadata=meta["metadata"], stage=cfg.registry.stage,
    )
