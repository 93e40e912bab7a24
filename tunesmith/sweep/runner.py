"""Running a sweep: an Optuna study whose trials are tunesmith training runs.

* every trial is a run directory ``OUT/trials/trial-NNN`` (config.yaml,
  metrics.jsonl, final/, ...) trained from the base config with the trial's values;
* the study lives in ``OUT/study.db`` (sqlite): a sweep that is killed continues
  where it stopped when the same command runs again; the trial that was running is
  marked failed ("interrupted") and tried again with the same values, resuming
  from its last complete checkpoint when it has one;
* pruning: an ``after_log`` hook reports the evaluation loss of every evaluation
  to Optuna and, when the pruner says so, calls ``run.request_stop(...)``; the
  trial ends as *pruned*;
* ``--parallel K`` runs K worker processes on the same study; trials are handed
  out under a file lock so exactly ``--trials`` finish.

Only one coordinator works on a sweep folder at a time (``OUT/sweep.lock``).
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from tunesmith import hookimpl
from tunesmith.core.errors import ConfigError, TunesmithError
from tunesmith.sweep.space import Param, parse_space, with_params

SPEC_FILE = "sweep.json"
PLUGIN_NAME = "tunesmith-sweep"


class SweepError(TunesmithError):
    """A sweep that cannot run as asked."""


@dataclass
class SweepSpec:
    """Everything a worker needs (written to ``OUT/sweep.json``)."""

    config: str
    overrides: list[str]
    space: dict
    space_source: str
    trials: int
    out_dir: str
    metric: str = "eval_loss"
    direction: str = "minimize"
    sampler: str = "tpe"
    pruner: str = "median"
    prune_on: str = "eval_loss"
    prune_startup_trials: int = 2
    prune_warmup_steps: int = 0
    seed: int = 42
    storage: str | None = None
    study_name: str | None = None
    keep_checkpoints: bool = False
    disable: list[str] = field(default_factory=list)
    #: values to try first (``--enqueue FILE``): a list of {config key: value}
    enqueue: list[dict] = field(default_factory=list)

    @property
    def out(self) -> Path:
        return Path(self.out_dir)

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{self.out / 'study.db'}"

    @property
    def name(self) -> str:
        return self.study_name or "sweep"

    def params(self) -> list[Param]:
        return parse_space(self.space, source=self.space_source)

    @classmethod
    def load(cls, out_dir: str | Path) -> "SweepSpec":
        p = Path(out_dir) / SPEC_FILE
        try:
            return cls(**json.loads(p.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as exc:
            raise SweepError(f"{p}: not a sweep description ({exc})") from None

    def save(self) -> None:
        from tunesmith.core.io import atomic_write_json

        atomic_write_json(self.out / SPEC_FILE, asdict(self))


# --------------------------------------------------------------------------- Optuna
def _optuna() -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def open_study(spec: SweepSpec, *, create: bool = False) -> Any:
    optuna = _optuna()
    storage = optuna.storages.RDBStorage(
        spec.storage_url, engine_kwargs={"connect_args": {"timeout": 60}} if spec.storage_url.startswith("sqlite") else {})
    if spec.sampler == "tpe":
        sampler = optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=min(10, max(2, spec.trials // 3)))
    elif spec.sampler == "random":
        sampler = optuna.samplers.RandomSampler(seed=spec.seed)
    else:
        raise SweepError(f"unknown sampler '{spec.sampler}'", hint="tpe or random")
    if spec.pruner == "median":
        pruner = optuna.pruners.MedianPruner(n_startup_trials=spec.prune_startup_trials,
                                             n_warmup_steps=spec.prune_warmup_steps)
    elif spec.pruner == "hyperband":
        pruner = optuna.pruners.HyperbandPruner()
    elif spec.pruner == "none":
        pruner = optuna.pruners.NopPruner()
    else:
        raise SweepError(f"unknown pruner '{spec.pruner}'", hint="median, hyperband or none")
    if create:
        study = optuna.create_study(storage=storage, study_name=spec.name, direction=spec.direction,
                                    sampler=sampler, pruner=pruner, load_if_exists=True)
        if study.direction.name.lower() != spec.direction:
            raise SweepError(f"the study '{spec.name}' in {spec.storage_url} maximises/minimises the other way "
                             f"({study.direction.name.lower()})", hint="use another --study-name or -o")
        return study
    return optuna.load_study(study_name=spec.name, storage=storage, sampler=sampler, pruner=pruner)


def _state(t: Any) -> str:
    return t.state.name.lower()


def counted(study: Any) -> int:
    """Trials that count towards ``--trials``: finished (complete, pruned, failed but not
    interrupted) or running now."""
    n = 0
    for t in study.get_trials(deepcopy=False):
        s = _state(t)
        if s in ("complete", "pruned", "running") or (s == "fail" and not t.user_attrs.get("interrupted")):
            n += 1
    return n


def finished(study: Any) -> int:
    return sum(1 for t in study.get_trials(deepcopy=False) if _state(t) in ("complete", "pruned")
               or (_state(t) == "fail" and not t.user_attrs.get("interrupted")))


def recover_interrupted(study: Any) -> list[int]:
    """Trials left running by a killed sweep: marked failed (interrupted) and queued again
    with the same values (and their run directory, to resume from its checkpoint)."""
    optuna = _optuna()
    out = []
    waiting = [t.params or t.system_attrs.get("fixed_params") for t in study.get_trials(deepcopy=False)
               if _state(t) == "waiting"]
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
        study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        if t.params and t.params not in waiting:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number, "resume_dir": t.user_attrs.get("run_dir")})
        out.append(t.number)
    return out


def enqueue_first(spec: SweepSpec, study: Any) -> int:
    """Queue ``spec.enqueue``'s values (each once: values some trial already has are skipped)."""
    seen = [dict(t.params or t.system_attrs.get("fixed_params") or {}) for t in study.get_trials(deepcopy=False)
            if not t.user_attrs.get("interrupted")]
    n = 0
    for params in spec.enqueue:
        if params not in seen:
            study.enqueue_trial(params)
            seen.append(params)
            n += 1
    return n


def check_enqueue(items: Any, params: list[Param], source: str) -> list[dict]:
    keys = {p.key: p for p in params}
    if not isinstance(items, list) or not all(isinstance(x, dict) for x in items):
        raise ConfigError("--enqueue takes a YAML list of mappings ({config key: value})", source=source)
    for i, item in enumerate(items):
        for k, v in item.items():
            p = keys.get(k)
            if p is None:
                raise ConfigError(f"item {i}: '{k}' is not a key of the search space", source=source)
            if p.kind == "choice" and v not in p.choices:
                raise ConfigError(f"item {i}: {k}={v!r} is not one of the choices {list(p.choices)}", source=source)
            if p.kind != "choice" and (not isinstance(v, (int, float)) or not p.low <= v <= p.high):
                raise ConfigError(f"item {i}: {k}={v!r} is outside [{p.low}, {p.high}]", source=source)
    return items


# --------------------------------------------------------------------------- pruning through the lifecycle hooks
class PruningHook:
    """An in-process plugin: reports ``prune_on`` at every logged evaluation to the
    current Optuna trial and stops the run when the pruner says so."""

    def __init__(self) -> None:
        self.trial: Any = None
        self.key = "eval_loss"
        self.sign = 1.0
        self.pruned_at: int | None = None
        self.reported: dict[int, float] = {}
        self.parent: int | None = None

    def start(self, trial: Any, key: str, sign: float) -> None:
        self.trial, self.key, self.sign, self.pruned_at, self.reported = trial, key, sign, None, {}

    def stop(self) -> None:
        self.trial = None

    @hookimpl
    def after_log(self, run: Any, step: int, logs: dict) -> None:
        if self.parent is not None and os.getppid() != self.parent:
            run.request_stop("the sweep that started this worker has gone")
            return
        if self.trial is None or self.pruned_at is not None:
            return
        value = logs.get(self.key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(float(value)):
            return
        v = self.sign * float(value)
        if step in self.reported:  # a resumed trial logs again what the killed one logged
            return
        self.reported[step] = v
        self.trial.report(v, step)
        if self.trial.should_prune():
            self.pruned_at = step
            run.request_stop(f"pruned by the sweep at step {step} ({self.key} {float(value):.4g})")


def _hook() -> PruningHook:
    from tunesmith.core import plugins

    existing = plugins._extra.get(PLUGIN_NAME)
    if isinstance(existing, PruningHook):
        return existing
    hook = PruningHook()
    plugins.register_plugin(hook, PLUGIN_NAME)
    return hook


# --------------------------------------------------------------------------- one trial
def base_data(spec: SweepSpec) -> tuple[dict, dict, Path]:
    from tunesmith.core.config import apply_overrides, read_yaml

    data, lines = read_yaml(spec.config)
    if spec.overrides:
        data = apply_overrides(data, spec.overrides)
    return data, lines, Path(spec.config).resolve().parent


def trial_config(spec: SweepSpec, params: dict, run_dir: Path, number: int, registries: Any) -> Any:
    from tunesmith.core.config import validate_config

    data, lines, base = base_data(spec)
    data = with_params(data, params)
    data["output_dir"] = str(run_dir)
    data["name"] = f"{data.get('name') or 'run'}-trial-{number:03d}"
    return validate_config(data, registries=registries, source=f"{spec.config} (trial {number})", lines=lines,
                           base_dir=base)


SPLIT_FILES = ("train.jsonl", "validation.jsonl", "test.jsonl")


def shares_data(spec: SweepSpec) -> bool:
    """Trials share one prepared data set unless the space varies ``data.*``."""
    return not any(p.key == "data" or p.key.startswith("data.") for p in spec.params())


def prepare_shared_data(spec: SweepSpec, say: Callable[[str], None]) -> None:
    """Load, clean and split the base config's data once into ``OUT/data`` (every trial
    trains and evaluates on the same rows; a resumed sweep reuses them)."""
    if not shares_data(spec) or (spec.out / "data" / "train.jsonl").exists():
        return
    from tunesmith.core.config import validate_config
    from tunesmith.core.data_ops import prepare_data
    from tunesmith.core.plugins import get_registries

    data, lines, base = base_data(spec)
    regs = get_registries(disable=tuple(spec.disable) + tuple((data.get("plugins") or {}).get("disable") or ()))
    cfg = validate_config(data, registries=regs, source=spec.config, lines=lines, base_dir=base)
    tmp = spec.out / "data.tmp"
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    summary = prepare_data(cfg, regs, tmp)
    tmp.rename(spec.out / "data")
    splits = summary.get("splits") or {}
    shown = ", ".join(f"{k} {v if isinstance(v, int) else (v or {}).get('rows', v)}" for k, v in splits.items())
    say(f"data prepared once for every trial in {spec.out / 'data'}" + (f" ({shown})" if shown else ""))


def link_shared_data(spec: SweepSpec, run_dir: Path) -> None:
    import shutil

    src = spec.out / "data"
    if not shares_data(spec) or not (src / "train.jsonl").exists():
        return
    dst = run_dir / "data"
    dst.mkdir(parents=True, exist_ok=True)
    for name in SPLIT_FILES:
        if (src / name).exists() and not (dst / name).exists():
            try:
                os.link(src / name, dst / name)
            except OSError:
                shutil.copyfile(src / name, dst / name)


def metric_value(result: dict, metric: str) -> float | None:
    """The trial's value: a key of the training result (``eval_loss``, ``train_loss``,
    ``best_eval_loss``, ...) or an evaluator metric ``evaluator.metric`` (tuned model)."""
    v = result.get(metric)
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
        return float(v)
    for row in result.get("metrics") or []:
        if f"{row.get('evaluator')}.{row.get('metric')}" == metric and isinstance(row.get("tuned"), (int, float)):
            return float(row["tuned"])
    return None


def run_trial(spec: SweepSpec, study: Any, trial: Any, hook: PruningHook, say: Callable[[str], None]) -> None:
    optuna = _optuna()
    from tunesmith.core.plugins import get_registries

    data, _, _ = base_data(spec)
    disable = tuple(spec.disable) + tuple((data.get("plugins") or {}).get("disable") or ())
    registries = get_registries(disable=disable)
    params = {p.key: p.suggest(trial) for p in spec.params()}
    resume_dir = trial.user_attrs.get("resume_dir")
    run_dir = Path(resume_dir) if resume_dir else spec.out / "trials" / f"trial-{trial.number:03d}"
    trial.set_user_attr("run_dir", str(run_dir))
    shown = ", ".join(f"{k}={_fmt(v)}" for k, v in params.items())
    say(f"trial {trial.number}: {shown}" + (f" (again: trial {trial.user_attrs['retry_of']} was interrupted)"
                                           if "retry_of" in trial.user_attrs else ""))
    t0 = time.time()
    try:
        cfg = trial_config(spec, params, run_dir, trial.number, registries)
        link_shared_data(spec, run_dir)  # the trial trains on the sweep's prepared split (RUN/data)
        # intermediate values go in the study's direction: a loss is negated when the metric is maximised
        hook.start(trial, spec.prune_on, -1.0 if spec.prune_on != spec.metric and spec.direction == "maximize" else 1.0)
        resume = bool(resume_dir) and any((run_dir / "checkpoints").glob("checkpoint-*"))
        if "." in spec.metric:  # an evaluator's metric: train, then evaluate
            from tunesmith.core.pipeline import run_pipeline

            result = run_pipeline(cfg, registries, until="evaluate", resume=resume, progress=False)
            result = {**(result.get("train") or {}), "metrics": result.get("metrics") or []}
        else:
            from tunesmith.core.session import train

            result = train(cfg, registries, resume=resume)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # noqa: BLE001 - one failing trial does not end the sweep
        hook.stop()
        msg = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:500]
        trial.set_user_attr("error", msg)
        trial.set_user_attr("seconds", round(time.time() - t0, 1))
        study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        say(f"trial {trial.number}: failed: {msg}")
        return
    hook_pruned = hook.pruned_at
    hook.stop()
    trial.set_user_attr("seconds", round(time.time() - t0, 1))
    for key in ("steps", "stop_reason", "train_loss", "eval_loss"):
        if result.get(key) is not None:
            trial.set_user_attr(key, result[key])
    if not spec.keep_checkpoints:
        import shutil

        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    if hook_pruned is not None:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED, skip_if_finished=True)
        say(f"trial {trial.number}: pruned at step {hook_pruned} ({time.time() - t0:.0f} s)")
        return
    value = metric_value(result, spec.metric)
    if value is None:
        trial.set_user_attr("error", f"the run reported no '{spec.metric}'")
        study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        say(f"trial {trial.number}: failed: the run reported no '{spec.metric}' (is there evaluation data?)")
        return
    study.tell(trial, value, skip_if_finished=True)
    say(f"trial {trial.number}: {spec.metric} {value:.4f} ({time.time() - t0:.0f} s)")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


# --------------------------------------------------------------------------- workers
def work(spec: SweepSpec, *, worker: int = 0, parent: int | None = None, say: Callable[[str], None] = print) -> int:
    """Take trials from the study until ``spec.trials`` have finished or are running;
    returns how many this worker ran."""
    from filelock import FileLock

    study = open_study(spec)
    hook = _hook()
    hook.parent = parent
    ran = 0
    while True:
        if parent is not None and os.getppid() != parent:
            break
        with FileLock(str(spec.out / "ask.lock"), timeout=300):
            if counted(study) >= spec.trials:
                break
            trial = study.ask()
            trial.set_user_attr("worker", worker)
        run_trial(spec, study, trial, hook, say)
        ran += 1
    return ran


def run_sweep(spec: SweepSpec, *, parallel: int = 1, say: Callable[[str], None] = print) -> dict:
    """Run (or continue) the sweep until ``spec.trials`` trials have finished; returns the
    report (:func:`tunesmith.sweep.report.write_report`)."""
    from filelock import FileLock, Timeout

    from tunesmith.sweep.report import write_report

    spec.out.mkdir(parents=True, exist_ok=True)
    check_spec(spec)
    lock = FileLock(str(spec.out / "sweep.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise SweepError(f"another sweep is running in {spec.out}", hint="wait for it, or use another -o") from None
    try:
        previous = spec.out / SPEC_FILE
        if previous.exists():
            old = SweepSpec.load(spec.out)
            for attr in ("space", "metric", "direction", "study_name", "storage"):
                if getattr(old, attr) != getattr(spec, attr):
                    raise SweepError(f"{spec.out} holds a sweep with another {attr.replace('_', ' ')} "
                                     f"({getattr(old, attr)!r})", hint="use another -o to start a new sweep")
        spec.save()
        prepare_shared_data(spec, say)
        study = open_study(spec, create=True)
        again = recover_interrupted(study)
        if again:
            say(f"continuing {spec.out}: trial(s) {', '.join(map(str, again))} were interrupted and run again")
        queued = enqueue_first(spec, study)
        if queued:
            say(f"queued {queued} trial(s) with the values of --enqueue")
        done = finished(study)
        if done:
            say(f"{done} of {spec.trials} trials already finished in {spec.storage_url}")
        t0 = time.time()
        if parallel <= 1:
            work(spec, say=say)
        else:
            procs = []
            threads = max(1, (os.cpu_count() or 1) // parallel)
            try:  # the workers print where this process prints (stderr under --json)
                stdout: Any = sys.stdout.fileno()
            except (AttributeError, OSError, ValueError):
                stdout = None
            for w in range(parallel):
                env = dict(os.environ)
                env.setdefault("OMP_NUM_THREADS", str(threads))
                env.setdefault("TUNESMITH_NO_PROGRESS", "1")
                procs.append(subprocess.Popen([sys.executable, "-m", "tunesmith.sweep.worker", str(spec.out), str(w),
                                               str(os.getpid())], env=env, stdout=stdout))
            codes = [p.wait() for p in procs]
            if any(codes):
                say(f"warning: worker exit codes {codes}")
        report = write_report(spec, open_study(spec), wall_s=time.time() - t0)
        return report
    finally:
        lock.release()


def _space_line(spec: SweepSpec, key: str) -> int | None:
    """The line of ``key`` in the space file (a dotted key or nested sections)."""
    from tunesmith.core.config import read_yaml

    try:
        _, lines = read_yaml(spec.space_source)
    except ConfigError:
        return None
    parts = key.split(".")
    for i in range(len(parts), 0, -1):  # "a.b.c" as one key, as a: {b.c}, as a: {b: {c}}, ...
        for split in range(1, i + 1):
            path = tuple(parts[:split - 1]) + (".".join(parts[split - 1:]),)
            if path in lines:
                return lines[path]
    return None


def check_spec(spec: SweepSpec) -> None:
    """Refuse a sweep that cannot work before any trial trains: every key of the space is
    tried against the config (each choice, each end of a range)."""
    from tunesmith.core.config import validate_config
    from tunesmith.core.plugins import get_registries

    if spec.trials < 1:
        raise SweepError("--trials must be at least 1")
    if spec.direction not in ("minimize", "maximize"):
        raise SweepError(f"--direction must be minimize or maximize, got '{spec.direction}'")
    params = spec.params()
    data, lines, base = base_data(spec)
    regs = get_registries(disable=tuple(spec.disable) + tuple((data.get("plugins") or {}).get("disable") or ()))
    for p in params:
        for value in p.sample_values():
            trial_data = with_params(copy.deepcopy(data), {p.key: value})
            try:
                validate_config(trial_data, registries=regs, source=spec.config, lines=lines, base_dir=base)
            except ConfigError as exc:
                raise ConfigError(f"{p.key} = {value!r} makes the config invalid: {exc}",
                                  source=spec.space_source, line=_space_line(spec, p.key)) from None
    cfg = validate_config(data, registries=regs, source=spec.config, lines=lines, base_dir=base)
    t = cfg.training
    needs_eval = spec.metric.startswith("eval_") or spec.metric == "best_eval_loss" or (spec.pruner != "none" and spec.prune_on.startswith("eval_"))
    if needs_eval and t.eval_steps <= 0:
        raise SweepError(f"the sweep uses '{spec.metric if spec.metric.startswith('eval_') else spec.prune_on}', "
                         "but training.eval_steps is 0: the trials would never evaluate",
                         hint="set training.eval_steps (and a validation split), or --metric train_loss --pruner none")
