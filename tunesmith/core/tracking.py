"""Experiment tracking: the loggers a run reports to (``training.report_to``).

:func:`open_loggers` opens, on rank 0, every logger the config selects (plus those
that are always on: ``jsonl`` keeps the run directory's metrics.jsonl) and returns
one :class:`LoggerSet` the caller drives::

    loggers = open_loggers(cfg, registries, context)   # logs the flattened config + config.yaml
    loggers.log_metrics({"loss": 1.9, "learning_rate": 2e-4, "epoch": 0.1}, step=10)
    loggers.log_artifact(run_dir / "plots" / "loss.png", "plot")
    loggers.close("finished", result)

On other ranks, and when nothing is selected, the set is empty and every call is a
no-op. A logger that fails to *open* fails the run before anything heavy starts
(``report_to: [mlflow]`` with a tracking server that is down is an error, not a
silent gap); a logger that fails *while logging* is reported once on stderr and
switched off, and training goes on.

Nesting: while a set is open for a run directory, opening loggers again for the
same run directory in the same process (the training session inside ``tunesmith
run``) returns a view of the open set whose ``close`` does nothing, so the
pipeline's data report, the training curves and the evaluation report land in
one MLflow / W&B run. ``resume`` (from ``context.state["resume"]``) reopens what
an earlier process started: the same MLflow run, the same W&B run id, the
metrics.jsonl rows up to the resumed step.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
from pathlib import Path
from typing import Any, Iterable

#: what ``log_artifact``'s ``kind`` may be
ARTIFACT_KINDS = ("config", "data_report", "eval_report", "plot", "adapter", "model")
#: where a run keeps what its loggers need to reopen it on resume (MLflow run id, W&B id)
TRACKING_DIR = "tracking"

_active: dict[str, "LoggerSet"] = {}
_lock = threading.Lock()


def is_main_process() -> bool:
    """Rank 0 of a torchrun / accelerate launch (or a single process)."""
    for var in ("RANK", "LOCAL_RANK"):
        value = os.environ.get(var)
        if value not in (None, "") and value != "0":
            return False
    return True


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"training": {"learning_rate": 1e-4}}`` -> ``{"training.learning_rate": 1e-4}``.

    Lists of scalars become JSON text; lists of mappings are indexed
    (``evaluation.0.name``); None stays None.
    """
    out: dict[str, Any] = {}
    if isinstance(data, dict):
        if not data and prefix:
            out[prefix.rstrip(".")] = "{}"
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(data, (list, tuple)):
        if data and all(isinstance(x, dict) for x in data):
            for i, v in enumerate(data):
                out.update(flatten(v, f"{prefix}{i}."))
        else:
            out[prefix.rstrip(".")] = json.dumps(list(data), default=str)
    else:
        out[prefix.rstrip(".")] = data
    return out


def numeric(metrics: dict) -> dict[str, float]:
    """The finite numbers of a logged row (booleans and text dropped)."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            try:  # numpy / torch scalars
                v = float(v.item()) if hasattr(v, "item") else None
            except (TypeError, ValueError):
                v = None
            if v is None:
                continue
        v = float(v)
        if math.isfinite(v):
            out[str(k)] = v
    return out


def tracking_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / TRACKING_DIR


def read_state(run_dir: str | Path, name: str) -> dict | None:
    """What logger ``name`` saved in the run directory (``tracking/<name>.json``), or None."""
    p = tracking_dir(run_dir) / f"{name}.json"
    if not p.exists():
        return None
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_state(run_dir: str | Path, name: str, data: dict) -> Path:
    from tunesmith.core.io import atomic_write_json

    return atomic_write_json(tracking_dir(run_dir) / f"{name}.json", data)


def selected_loggers(cfg: Any, registries: Any) -> list[tuple[str, Any, Any]]:
    """``[(name, logger plugin, validated options)]``: ``training.report_to`` in its
    order (unset: the loggers ``enabled_by_default``), then every always-on logger it
    does not list."""
    from tunesmith.core.registry import member

    out: list[tuple[str, Any, Any]] = []
    seen: set[str] = set()
    specs = getattr(cfg.training, "report_to", None)
    if specs is None:
        specs = [n for n, p in registries.loggers.items() if member(p, "loggers", "enabled_by_default")]
    for spec in list(specs):
        name = spec if isinstance(spec, str) else spec.plugin_name
        plugin = registries.loggers.get(name)
        options = None if isinstance(spec, str) else spec._options
        if options is None and getattr(plugin, "Options", None) is not None:
            options = plugin.Options.model_validate({} if isinstance(spec, str) else spec.plugin_fields())
        if name in seen:
            continue
        seen.add(name)
        out.append((name, plugin, options))
    for name, plugin in registries.loggers.items():
        if name not in seen and member(plugin, "loggers", "always_on"):
            opts_model = getattr(plugin, "Options", None)
            out.append((name, plugin, opts_model() if opts_model is not None else None))
    return out


class LoggerSet:
    """The open loggers of one run; every method fans out to each of them."""

    def __init__(self, runs: Iterable[tuple[str, Any]] = (), *, run_dir: Path | None = None, owner: "LoggerSet | None" = None) -> None:
        self._runs: list[tuple[str, Any]] = list(runs)
        self._owner = owner  # set on a borrowed view: close() is the owner's business
        self.run_dir = run_dir
        self.errors: list[str] = []
        self.closed = False
        self._logged: set[tuple[str, str]] = set()

    # -- what is open --------------------------------------------------------
    @property
    def names(self) -> list[str]:
        base = self._owner if self._owner is not None else self
        return [n for n, _ in base._runs]

    def get(self, name: str) -> Any:
        """The open ``LoggerRun`` of logger ``name`` (None if it is not open)."""
        base = self._owner if self._owner is not None else self
        return next((r for n, r in base._runs if n == name), None)

    def __bool__(self) -> bool:
        return bool(self.names)

    def __len__(self) -> int:
        return len(self.names)

    # -- fan-out ------------------------------------------------------------
    def _call(self, method: str, *args: Any) -> None:
        base = self._owner if self._owner is not None else self
        if base.closed:
            return
        for name, run in list(base._runs):
            try:
                getattr(run, method)(*args)
            except Exception as exc:  # noqa: BLE001 - a logger never takes training down
                base._drop(name, method, exc)

    def _drop(self, name: str, method: str, exc: BaseException) -> None:
        msg = f"logger '{name}' failed in {method} and is switched off for this run: {type(exc).__name__}: {exc}"
        self.errors.append(msg)
        print(f"warning: {msg}", file=sys.stderr, flush=True)
        dropped = [r for n, r in self._runs if n == name]
        self._runs = [(n, r) for n, r in self._runs if n != name]
        if method != "close":  # let it release what it holds (files, a W&B process)
            for run in dropped:
                try:
                    run.close("failed", None)
                except Exception:  # noqa: BLE001
                    pass

    def log_params(self, params: dict) -> None:
        """Parameters (flattened config keys -> numbers, strings, booleans, None)."""
        if params:
            self._call("log_params", dict(params))

    def log_metrics(self, metrics: dict, step: int) -> None:
        """One logged row (train or eval values, RL curves) at ``step``."""
        metrics = {k: v for k, v in metrics.items() if k != "step"}  # the step is the argument
        if metrics:
            self._call("log_metrics", metrics, int(step))

    def log_artifact(self, path: str | Path, kind: str) -> None:
        """A file or folder of the run; ``kind`` in :data:`ARTIFACT_KINDS`. A missing
        path is skipped; the same path and kind twice is logged once."""
        if kind not in ARTIFACT_KINDS:
            raise ValueError(f"unknown artefact kind '{kind}' (kinds: {', '.join(ARTIFACT_KINDS)})")
        p = Path(path)
        if not p.exists():
            return
        base = self._owner if self._owner is not None else self
        key = (str(p.resolve()), kind)
        if key in base._logged:
            return
        base._logged.add(key)
        self._call("log_artifact", p, kind)

    def close(self, status: str = "finished", result: dict | None = None) -> None:
        """End every logger (``status``: ``finished`` or ``failed``); idempotent. On a
        borrowed view (a nested open) this does nothing: the owner closes."""
        if self._owner is not None or self.closed:
            return
        if status not in ("finished", "failed"):
            raise ValueError(f"status must be 'finished' or 'failed', got '{status}'")
        for name, run in list(self._runs):
            try:
                run.close(status, result)
            except Exception as exc:  # noqa: BLE001
                self._drop(name, "close", exc)
        self.closed = True
        if self.run_dir is not None:
            with _lock:
                if _active.get(str(self.run_dir)) is self:
                    del _active[str(self.run_dir)]

    def __enter__(self) -> "LoggerSet":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close("failed" if exc_type is not None else "finished", None)


def active(run_dir: str | Path) -> LoggerSet | None:
    """The set open for ``run_dir`` in this process, if any."""
    with _lock:
        s = _active.get(str(Path(run_dir).resolve()))
    return s if s is not None and not s.closed else None


def open_loggers(cfg: Any, registries: Any, context: Any, *, resume: bool | None = None) -> LoggerSet:
    """Open the loggers of ``cfg`` for the run of ``context`` (a RunContext with
    ``run_dir``). Rank 0 only; an empty set elsewhere or when nothing is selected.

    ``resume`` defaults to ``context.state["resume"]``. Right after opening, the
    flattened resolved config is logged as parameters and ``RUN/config.yaml`` as
    the ``config`` artefact. A logger that cannot open is a
    :class:`~tunesmith.core.errors.TunesmithError` (the ones opened before it are
    closed as failed).
    """
    from tunesmith.core.errors import TunesmithError

    run_dir = Path(getattr(context, "run_dir", None) or cfg.resolve_path(cfg.output_dir)).resolve()
    if not is_main_process():
        return LoggerSet(run_dir=None)
    state = getattr(context, "state", None)
    held = state.get("loggers") if isinstance(state, dict) else None
    if isinstance(held, LoggerSet) and not held.closed:
        return LoggerSet(owner=held._owner or held)
    existing = active(run_dir)
    if existing is not None:
        return LoggerSet(owner=existing)
    if registries is None:
        from tunesmith.core.plugins import get_registries

        registries = get_registries(disable=tuple(cfg.plugins.disable), strict=cfg.plugins.strict)
    if resume is None:
        resume = bool(state.get("resume")) if isinstance(state, dict) else False
    selected = selected_loggers(cfg, registries)
    runs: list[tuple[str, Any]] = []
    for name, plugin, options in selected:
        try:
            runs.append((name, plugin.open(context, options, bool(resume))))
        except Exception as exc:  # noqa: BLE001
            for _n, r in runs:
                try:
                    r.close("failed", None)
                except Exception:  # noqa: BLE001
                    pass
            if isinstance(exc, TunesmithError):
                raise TunesmithError(f"logger '{name}' could not start: {exc.message}", hint=exc.hint) from exc
            raise TunesmithError(f"logger '{name}' could not start: {type(exc).__name__}: {exc}",
                                 hint=f"fix its options under training.report_to or remove '{name}' from it") from exc
    loggers = LoggerSet(runs, run_dir=run_dir)
    if runs:
        with _lock:
            _active[str(run_dir)] = loggers
        loggers.log_params(flatten(cfg.to_dict()))
        loggers.log_artifact(run_dir / "config.yaml", "config")
    if isinstance(state, dict):
        state["loggers"] = loggers
    return loggers


def checkpoint_step(run_dir: str | Path) -> int | None:
    """The step of the newest complete checkpoint (``checkpoints/checkpoint-N`` with
    its trainer_state.json): where a resumed training run continues."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    steps = []
    for p in folder.iterdir():
        name = p.name
        if p.is_dir() and name.startswith("checkpoint-") and name[11:].isdigit() and (p / "trainer_state.json").exists():
            steps.append(int(name[11:]))
    return max(steps) if steps else None


def run_artifacts(run_dir: str | Path, stage: str) -> list[tuple[Path, str]]:
    """The files a pipeline stage leaves in the run directory, as ``(path, kind)``
    for :meth:`LoggerSet.log_artifact` (missing ones are left out)::

        data      data/report.md, data/report.json (data_report), data/token_lengths.png (plot)
        train     plots/*.png (plot), final/ (adapter; model for a full fine-tune)
        evaluate  eval/report.md, eval/report.json (eval_report), eval/charts/*.png (plot)
        export    exports/<format>/ other than the adapter (model)
    """
    root = Path(run_dir)
    out: list[tuple[Path, str]] = []
    if stage == "data":
        out += [(root / "data" / n, "data_report") for n in ("report.md", "report.json")]
        out += [(p, "plot") for p in sorted((root / "data").glob("*.png"))]
    elif stage == "train":
        out += [(p, "plot") for p in sorted((root / "plots").glob("*.png"))]
        final = root / "final"
        if final.is_dir():
            out.append((final, "adapter" if (final / "adapter_config.json").exists() else "model"))
    elif stage == "evaluate":
        out += [(root / "eval" / n, "eval_report") for n in ("report.md", "report.json")]
        out += [(p, "plot") for p in sorted((root / "eval" / "charts").glob("*.png"))]
    elif stage == "export":
        exports = root / "exports"
        if exports.is_dir():
            out += [(p, "model") for p in sorted(exports.iterdir()) if p.name != "adapter" and not p.name.startswith(".")]
    return [(p, k) for p, k in out if p.exists()]


def pipeline_results(summary: dict) -> dict:
    """The numbers of a pipeline summary that loggers record as final values:
    ``train.*`` (loss, eval loss, steps, seconds), ``tuned.<evaluator>.<metric>``
    and ``base.<evaluator>.<metric>``."""
    out: dict[str, Any] = {}
    train = summary.get("train") or {}
    out["train"] = {k: v for k, v in train.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for row in summary.get("metrics") or []:
        for side in ("tuned", "base"):
            v = row.get(side)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out.setdefault(side, {}).setdefault(row["evaluator"], {})[row["metric"]] = v
    if isinstance(summary.get("wall_seconds"), (int, float)):
        out["wall_seconds"] = summary["wall_seconds"]
    return out


def stage_reporter(loggers: LoggerSet, run_dir: str | Path, on_stage: Any = None) -> Any:
    """An ``on_stage(stage, event, info)`` callback for :func:`~tunesmith.core.pipeline.run_pipeline`:
    logs each finished stage's files (:func:`run_artifacts`) and closes the loggers as
    failed when a stage fails; then calls ``on_stage``."""

    def report(stage: str, event: str, info: dict) -> None:
        if event == "done":
            for path, kind in run_artifacts(run_dir, stage):
                loggers.log_artifact(path, kind)
        elif event == "failed":
            loggers.close("failed", None)
        if on_stage is not None:
            on_stage(stage, event, info)

    return report
