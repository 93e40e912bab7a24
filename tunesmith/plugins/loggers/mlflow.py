"""``mlflow`` logger: one MLflow run per tunesmith run.

Logs the flattened resolved config as params, every logged row as step metrics,
the final results (training result, evaluation metrics of base and tuned model)
as metrics at the last step, and the run's files as artefacts under folders named
for their kind: ``config/`` (config.yaml), ``data/`` (the data report),
``eval/`` (the evaluation report), ``plots/`` (PNG curves), ``adapter/`` (the
trained adapter). ``model`` artefacts (merged models) are off by default: add
``model`` to ``artifacts``.

The store is ``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else MLflow's own
default. The run id is kept in ``RUN/tracking/mlflow.json``; a resumed run (from a
checkpoint, or ``tunesmith run --from evaluate``) reopens that MLflow run instead
of starting another. Talks to MLflow through ``MlflowClient`` only (no global
active run), so it never disturbs a user's own ``mlflow.start_run()``.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tunesmith import hookimpl

KIND_DIRS = {"config": "config", "data_report": "data", "eval_report": "eval", "plot": "plots",
             "adapter": "adapter", "model": "model"}
_BAD = re.compile(r"[^A-Za-z0-9_\-. /:]")
Kind = Literal["config", "data_report", "eval_report", "plot", "adapter", "model"]


def mlflow_key(key: str) -> str:
    """MLflow keys allow letters, digits, ``_ - . / :`` and spaces (at most 250)."""
    return _BAD.sub("_", str(key))[:250]


def _chunks(items: list, n: int) -> Any:
    for i in range(0, len(items), n):
        yield items[i:i + n]


class MlflowRun:
    def __init__(self, client: Any, run_id: str, *, tracking_uri: str, kinds: set[str], resumed: bool) -> None:
        self.client = client
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.kinds = kinds
        self.resumed = resumed
        self.last_step = 0
        self.last: dict[str, tuple[int, float]] = {}  # key -> (step, value) last logged

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param, RunTag
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        existing = self.client.get_run(self.run_id).data.params if self.resumed else {}
        new, changed = [], []
        for k, v in params.items():
            key = mlflow_key(k)
            value = ("" if v is None else str(v))[:MAX_PARAM_VAL_LENGTH]
            if key in existing:
                if existing[key] != value:  # MLflow params are write-once: record what the resumed run changed
                    changed.append(RunTag(f"tunesmith.resumed_with.{key}"[:250], value[:8000]))
                continue
            new.append(Param(key, value))
        for chunk in _chunks(new, 100):
            self.client.log_batch(self.run_id, params=chunk, synchronous=True)
        for chunk in _chunks(changed, 100):
            self.client.log_batch(self.run_id, tags=chunk, synchronous=True)

    def log_metrics(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        from tunesmith.core.tracking import numeric

        ts = int(time.time() * 1000)
        values = [Metric(mlflow_key(k), v, ts, int(step)) for k, v in numeric(metrics).items()]
        self.last.update({m.key: (m.step, m.value) for m in values})
        for chunk in _chunks(values, 1000):
            self.client.log_batch(self.run_id, metrics=chunk, synchronous=True)
        self.last_step = max(self.last_step, int(step))

    def log_artifact(self, path: Any, kind: str) -> None:
        if kind not in self.kinds:
            return
        p = Path(path)
        folder = KIND_DIRS[kind]
        if p.is_dir():
            self.client.log_artifacts(self.run_id, str(p), artifact_path=folder)
        else:
            self.client.log_artifact(self.run_id, str(p), artifact_path=folder)

    def close(self, status: str, result: dict | None) -> None:
        from tunesmith.core.tracking import flatten, numeric

        if result:
            final = numeric(flatten(result))
            step = int(result.get("steps") or self.last_step) if isinstance(result.get("steps"), (int, float)) else self.last_step
            # a result value the last row already logged at this step (eval_loss) is not logged twice
            final = {k: v for k, v in final.items() if k != "steps" and self.last.get(mlflow_key(k)) != (step, v)}
            if final:
                self.log_metrics(final, step)
        self.client.set_terminated(self.run_id, status="FINISHED" if status == "finished" else "FAILED")


class MlflowLogger:
    name = "mlflow"
    description = "MLflow tracking: params, step metrics, config/data report/eval report/plots/adapter as artefacts"

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        tracking_uri: str | None = Field(
            None, description="sqlite:///path/mlflow.db, http://127.0.0.1:5000, ... Default: $MLFLOW_TRACKING_URI, else MLflow's default.")
        experiment: str | None = Field(None, description="Experiment name (created if missing). Default: the config's name, else 'tunesmith'.")
        run_name: str | None = Field(None, description="Run name. Default: the config's name, else the run directory's name.")
        tags: dict[str, str] = Field(default_factory=dict, description="Extra run tags.")
        artifacts: list[Kind] = Field(
            default_factory=lambda: ["config", "data_report", "eval_report", "plot", "adapter"],
            description="Which kinds of run files to upload (add 'model' for merged models).")
        artifact_location: str | None = Field(
            None, description="Artefact root of a new experiment. Default: MLflow's, or <db folder>/mlartifacts for a sqlite store.")

    def open(self, run: Any, options: Any, resume: bool) -> MlflowRun:
        from tunesmith.core.errors import TunesmithError
        from tunesmith.core.tracking import read_state, write_state
        from tunesmith.model_registry.mlflow_store import check_sqlite, make_client, prepare_mlflow, sqlite_path

        prepare_mlflow()
        options = options or self.Options()
        cfg = run.config
        run_dir = Path(run.run_dir)
        uri = options.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            import mlflow

            uri = mlflow.get_tracking_uri()
        db = sqlite_path(uri)
        if db is not None:
            if not db.is_absolute():
                db = db.resolve()
                uri = f"sqlite:///{db}"
            check_sqlite(db)
        client = make_client(uri)
        saved = read_state(run_dir, "mlflow") if resume else None
        if saved and saved.get("run_id") and saved.get("tracking_uri") == uri:
            try:
                client.get_run(saved["run_id"])
                client.update_run(saved["run_id"], status="RUNNING")
                return MlflowRun(client, saved["run_id"], tracking_uri=uri, kinds=set(options.artifacts), resumed=True)
            except Exception:  # noqa: BLE001 - the run is gone: start a new one
                pass
        name = getattr(cfg, "name", None)
        exp_name = options.experiment or name or "tunesmith"
        exp = client.get_experiment_by_name(exp_name)
        if exp is None:
            location = options.artifact_location
            if location is None and db is not None:
                location = (db.parent / "mlartifacts").resolve().as_uri()
            try:
                # the classic runs table in MLflow 3's UI (not its GenAI trace view)
                exp_id = client.create_experiment(exp_name, artifact_location=location,
                                                  tags={"mlflow.experimentKind": "custom_model_development"})
            except Exception:  # noqa: BLE001 - created meanwhile by another process
                exp = client.get_experiment_by_name(exp_name)
                if exp is None:
                    raise
                exp_id = exp.experiment_id
        else:
            if exp.lifecycle_stage == "deleted":
                raise TunesmithError(f"the MLflow experiment '{exp_name}' is deleted",
                                     hint="restore it (mlflow experiments restore) or set report_to's experiment:")
            exp_id = exp.experiment_id
        tags = {"tunesmith.run_dir": str(run_dir.resolve()), "tunesmith.config_hash": cfg.hash() if hasattr(cfg, "hash") else "",
                "mlflow.source.name": "tunesmith", **options.tags}
        objective = getattr(getattr(cfg, "objective", None), "name", getattr(cfg, "objective", None))
        if objective:
            tags["tunesmith.objective"] = str(objective)
        created = client.create_run(exp_id, run_name=options.run_name or name or run_dir.name, tags=tags)
        run_id = created.info.run_id
        write_state(run_dir, "mlflow", {"tracking_uri": uri, "experiment_id": exp_id, "run_id": run_id,
                                        "experiment": exp_name})
        return MlflowRun(client, run_id, tracking_uri=uri, kinds=set(options.artifacts), resumed=False)


@hookimpl
def register_loggers(register: Any) -> None:
    register(MlflowLogger())
