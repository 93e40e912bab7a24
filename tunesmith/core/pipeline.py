"""The pipeline behind ``tunesmith run``: every stage of one config in one run directory.

Stages, in order (``load``, ``clean``, ``format`` and ``split`` are one stage,
``data``, because they stream through each other and write one set of files)::

    data -> train -> evaluate -> export -> register

Each stage's plugins come from the registries, so a third-party plugin named in
the config takes part with no code change here.

The run directory holds ``pipeline.json``, the stage state: for each stage its
status (``done``, ``failed``, ``running``), times, the config hash it ran with and
what it returned. ``--from STAGE`` checks that the earlier stages are done and
reuses what they wrote; a failed stage names the ``--from`` that restarts it.
``summary.json`` is what the at-a-glance summary shows.
"""

from __future__ import annotations

import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from tunesmith.core.context import RunContext
from tunesmith.core.errors import TunesmithError
from tunesmith.core.io import atomic_write_json
from tunesmith.core.rundir import RunDir

STAGES = ("data", "train", "evaluate", "export", "register")
#: names a user may pass to --from, mapped to the stage that does that work
STAGE_ALIASES = {"load": "data", "clean": "data", "format": "data", "split": "data", "eval": "evaluate",
                 "evaluation": "evaluate", "registry": "register", **{s: s for s in STAGES}}
STATE_FILE = "pipeline.json"


class StageError(TunesmithError):
    """A stage failed; the message names the stage and how to restart from it."""


def stage_name(name: str) -> str:
    try:
        return STAGE_ALIASES[name.lower()]
    except KeyError:
        raise TunesmithError(f"unknown stage '{name}'", hint="stages: " + ", ".join(STAGES)) from None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_state(run_dir: Path) -> dict:
    import json

    p = Path(run_dir) / STATE_FILE
    if not p.exists():
        return {"stages": {}}
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except ValueError:
        raise TunesmithError(f"{p} is not valid JSON", hint="delete it to start the run afresh") from None
    data.setdefault("stages", {})
    return data


def write_state(run_dir: Path, state: dict) -> None:
    atomic_write_json(Path(run_dir) / STATE_FILE, state)


# --------------------------------------------------------------------------- the stages
def stage_data(cfg: Any, regs: Any, rd: RunDir, ctx: RunContext, progress: bool) -> dict:
    from tunesmith.core.data_ops import prepare_data

    return prepare_data(cfg, regs, rd.data_dir, ctx, progress=progress)


def stage_train(cfg: Any, regs: Any, rd: RunDir, ctx: RunContext, progress: bool) -> dict:
    from tunesmith.core.session import train

    # a training stage that failed (or was killed) restarts from its last complete
    # checkpoint when it is run again with --from/--resume; a fresh run starts over
    resume = bool(ctx.state.get("retrying_train")) and rd.checkpoints_dir.exists() and any(
        rd.checkpoints_dir.glob("checkpoint-*"))
    result = train(cfg, regs, resume=resume)
    return dict(result or {})


def stage_evaluate(cfg: Any, regs: Any, rd: RunDir, ctx: RunContext, progress: bool) -> dict:
    from tunesmith.core.evaluation import evaluate_run

    report = evaluate_run(cfg, regs, rd, compare_base=True)
    return _eval_digest(report)


def stage_export(cfg: Any, regs: Any, rd: RunDir, ctx: RunContext, progress: bool) -> dict:
    from tunesmith.core.export import export_run

    out: dict[str, str] = {}
    for spec in cfg.export:
        opts = spec._options if spec._options is not None else spec.plugin_fields()
        # the run's own export folder is rewritten when the stage is run again
        path = export_run(rd.root, spec.format, overwrite=True, registries=regs, options=opts, context=ctx)
        out[spec.format] = str(path)
    return {"artefacts": out}


def registry_dir(cfg: Any) -> Path:
    """The registry folder of a config: ``registry.path``, plus ``registry.name`` as a sub-folder when set."""
    root = Path(cfg.resolve_path(cfg.registry.path))
    return root / cfg.registry.name if cfg.registry.name else root


def stage_register(cfg: Any, regs: Any, rd: RunDir, ctx: RunContext, progress: bool) -> dict:
    if not cfg.registry.enabled:
        return {"skipped": "registry.enabled is false"}
    from tunesmith.model_registry import open_config_registry
    from tunesmith.model_registry.state import run_metadata

    meta = run_metadata(rd.root)
    meta["metadata"].update({"config": cfg.source, "name": cfg.name})
    # the headline metrics of the tuned model, flat (registry entries are compared by them)
    metrics = {f"{r['evaluator']}.{r['metric']}": r["tuned"] for r in metric_rows(
        ((read_state(rd.root).get("stages") or {}).get("evaluate") or {}).get("result") or {}) if r["tuned"] is not None}
    metrics = metrics or meta["metrics"]
    folder = registry_dir(cfg)
    store = open_config_registry(cfg, regs)  # the registry.backend plugin (local versions.json, mlflow, ...)
    entry = store.register(
        meta["artifacts"], metrics=metrics, config_hash=cfg.hash(), base_model=meta["base_model"],
        metadata=meta["metadata"], stage=cfg.registry.stage,
    )
    return {"name": cfg.registry.name or folder.name, "version": entry["version"], "stage": entry["stage"],
            "path": str(folder), "backend": cfg.registry.backend, "location": store.location,
            "artifacts": entry["artifacts"]}


STAGE_FUNCS: dict[str, Callable[..., dict]] = {
    "data": stage_data,
    "train": stage_train,
    "evaluate": stage_evaluate,
    "export": stage_export,
    "register": stage_register,
}


def _eval_digest(report: dict) -> dict:
    """The parts of the evaluation report the summary needs (no samples)."""
    keep = {}
    for k in ("metrics", "comparison", "eval_dir", "files", "base", "tuned"):
        if k in report:
            keep[k] = report[k]
    for side in ("base", "tuned"):
        if isinstance(keep.get(side), dict):
            keep[side] = {n: {"metrics": (r or {}).get("metrics", {})} for n, r in keep[side].items()}
    return keep


# --------------------------------------------------------------------------- running
def plan_stages(state: dict, *, from_stage: str | None, resume: bool, until: str | None = None) -> list[str]:
    """The stages to run now, checking that the ones skipped are done."""
    done = {s for s, v in state.get("stages", {}).items() if v.get("status") == "done"}
    if resume and from_stage is None:
        from_stage = next((s for s in STAGES if s not in done), None)
        if from_stage is None:
            return []
    start = STAGES.index(stage_name(from_stage)) if from_stage else 0
    end = STAGES.index(stage_name(until)) + 1 if until else len(STAGES)
    missing = [s for s in STAGES[:start] if s not in done]
    if missing:
        raise TunesmithError(
            f"cannot start from '{STAGES[start]}': the stage '{missing[0]}' has not completed in this run directory",
            hint=f"run with --from {missing[0]} (or without --from)",
        )
    return list(STAGES[start:end])


def run_pipeline(
    cfg: Any,
    registries: Any,
    *,
    from_stage: str | None = None,
    resume: bool = False,
    until: str | None = None,
    progress: bool = True,
    on_stage: Callable[[str, str, dict], None] | None = None,
) -> dict:
    """Run the stages of ``cfg`` in its run directory; returns the summary (also summary.json).

    :param from_stage: start here, reusing the outputs of the earlier (done) stages.
    :param resume: start from the first stage that is not done.
    :param until: stop after this stage.
    :param on_stage: called as ``on_stage(stage, event, info)`` with event
        ``start``, ``done`` or ``failed`` (the CLI prints progress with it).
    """
    from tunesmith.core.plugins import activate

    with activate(registries):  # every stage keeps the config's plugins.disable
        return _run_pipeline(cfg, registries, from_stage=from_stage, resume=resume, until=until,
                             progress=progress, on_stage=on_stage)


def _run_pipeline(cfg: Any, registries: Any, *, from_stage: str | None, resume: bool, until: str | None,
                  progress: bool, on_stage: Callable[[str, str, dict], None] | None) -> dict:
    rd = RunDir(RunDir.for_config(cfg).root.resolve()).ensure()
    state = read_state(rd.root)
    stages = plan_stages(state, from_stage=from_stage, resume=resume, until=until)
    previous_train = (state.get("stages", {}).get("train") or {}).get("status")
    if not from_stage and not resume:
        # a fresh run: forget what an earlier run in this directory did
        state = {"stages": {}}
    cfg_hash = cfg.hash()
    state.update({"config": cfg.source, "config_hash": cfg_hash, "run_dir": str(rd.root)})
    state.setdefault("started", _now())
    rd.write_config(cfg)
    write_state(rd.root, state)
    ctx = RunContext(config=cfg, run_dir=rd.root, registries=registries)
    ctx.state["retrying_train"] = bool(from_stage or resume) and previous_train in ("failed", "running")
    # one set of loggers for the whole run (the training session joins it): data report,
    # curves, evaluation report and artefacts land in one MLflow / W&B run
    from tunesmith.core.tracking import open_loggers, pipeline_results, stage_reporter

    loggers = open_loggers(cfg, registries, ctx, resume=bool(from_stage or resume))
    on_stage = stage_reporter(loggers, rd.root, on_stage)
    warnings: list[str] = []
    for s in STAGES[: STAGES.index(stages[0])] if stages else []:
        prev = state["stages"].get(s, {})
        if prev.get("config_hash") and prev["config_hash"] != cfg_hash:
            warnings.append(f"reusing the '{s}' stage, which ran with a different config")
    for s in stages:
        entry = {"status": "running", "started": _now(), "config_hash": cfg_hash}
        state["stages"][s] = entry
        write_state(rd.root, state)
        if on_stage:
            on_stage(s, "start", entry)
        t0 = time.perf_counter()
        try:
            result = STAGE_FUNCS[s](cfg, registries, rd, ctx, progress)
        except BaseException as exc:
            entry.update(status="failed", seconds=round(time.perf_counter() - t0, 2), finished=_now(),
                         error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(limit=20))
            write_state(rd.root, state)
            if on_stage:
                on_stage(s, "failed", entry)
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            msg = str(exc) if isinstance(exc, TunesmithError) else f"{type(exc).__name__}: {exc}"
            raise StageError(
                f"stage '{s}' failed: {msg}",
                hint=f"fix it and rerun with --from {s}; details in {rd.root / STATE_FILE}",
            ) from exc
        entry.update(status="done", seconds=round(time.perf_counter() - t0, 2), finished=_now(), result=result)
        write_state(rd.root, state)
        if on_stage:
            on_stage(s, "done", entry)
    state["finished"] = _now()
    write_state(rd.root, state)
    summary = build_summary(cfg, rd, state, warnings=warnings)
    rd.write_summary(summary)
    loggers.close("finished", pipeline_results(summary))
    return summary


# --------------------------------------------------------------------------- the summary
def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def metric_rows(eval_result: dict) -> list[dict]:
    """``[{evaluator, metric, base, tuned, change}]`` from the evaluate stage's result."""
    rows = []
    base = eval_result.get("base") or {}
    tuned = eval_result.get("tuned") or {}
    for ev in sorted(set(base) | set(tuned)):
        bm = (base.get(ev) or {}).get("metrics", {})
        tm = (tuned.get(ev) or {}).get("metrics", {})
        for m in list(dict.fromkeys([*bm, *tm])):
            b, t = _num(bm.get(m)), _num(tm.get(m))
            if b is None and t is None:
                continue
            change = None
            if b is not None and t is not None and b != 0:
                change = (t - b) / abs(b)
            rows.append({"evaluator": ev, "metric": m, "base": b, "tuned": t, "change": change})
    return rows


def build_summary(cfg: Any, rd: RunDir, state: dict, *, warnings: list[str] | None = None) -> dict:
    st = state.get("stages", {})

    def res(s: str) -> dict:
        return (st.get(s) or {}).get("result") or {}

    data = res("data")
    train = res("train")
    ev = res("evaluate")
    exp = res("export")
    reg = res("register")
    clean = data.get("cleaning") or data.get("clean") or {}
    splits = data.get("splits") or {}
    summary: dict[str, Any] = {
        "name": cfg.name or rd.root.name,
        "config": cfg.source,
        "run_dir": str(rd.root),
        "stages": {s: {k: v for k, v in (st.get(s) or {}).items() if k in ("status", "seconds", "error")} for s in STAGES},
        "data": {
            "rows_in": data.get("total", data.get("rows_in", clean.get("rows_in"))),
            "kept": data.get("valid", data.get("kept", clean.get("kept"))),
            "rejected": data.get("invalid", data.get("rejected", clean.get("rejected"))),
            "rejected_by": _rejected_by(data),
            "splits": {k: (v if isinstance(v, int) else (v or {}).get("rows", v)) for k, v in splits.items()},
            "report": str(rd.data_dir / "report.md") if (rd.data_dir / "report.md").exists() else None,
        },
        "train": {
            "loss": train.get("train_loss"),
            "last_loss": _last_logged(rd.metrics_path, "loss"),
            "eval_loss": train.get("eval_loss"),
            "steps": train.get("steps", train.get("global_step")),
            "seconds": train.get("runtime_s", (st.get("train") or {}).get("seconds")),
            "trainable_params": train.get("trainable_params"),
            "output": train.get("output_path"),
        },
        "metrics": metric_rows(ev),
        "artefacts": {
            "plots": str(rd.plots_dir) if rd.plots_dir.exists() else None,
            "eval_report": str(rd.eval_dir / "report.md") if (rd.eval_dir / "report.md").exists() else None,
            "metrics": str(rd.metrics_path) if rd.metrics_path.exists() else None,
            "final": str(rd.final_dir) if rd.final_dir.exists() else None,
            "exports": exp.get("artefacts", {}),
        },
        "registry": {k: reg.get(k) for k in ("name", "version", "stage", "path", "skipped") if reg.get(k) is not None},
        "warnings": list(warnings or []),
        "wall_seconds": round(sum((st.get(s) or {}).get("seconds") or 0 for s in STAGES), 1),
    }
    return summary


def _last_logged(path: Path, key: str) -> float | None:
    """The last value of ``key`` in metrics.jsonl (the mean train loss hides the final one)."""
    import json

    if not path.exists():
        return None
    last = None
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row.get(key), (int, float)):
            last = float(row[key])
    return last


def _rejected_by(data: dict) -> dict:
    out: dict[str, int] = {}
    clean = data.get("cleaning") or data.get("clean") or {}
    for c in clean.get("cleaners", []) or data.get("cleaners", []) or []:
        if isinstance(c, dict) and c.get("rejected"):
            out[c.get("name", "?")] = c["rejected"]
    if data.get("unreadable"):
        out["unreadable"] = data["unreadable"]
    return out
