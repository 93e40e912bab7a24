"""``wandb`` logger: Weights & Biases, offline by default (no account, no network).

Offline runs are written under ``RUN/wandb/offline-run-*`` and can be uploaded
later with ``wandb sync RUN/wandb/offline-run-*``; ``mode: online`` logs live
(``WANDB_API_KEY`` or ``wandb login``). The flattened config is the run's config,
every logged row a history step, the final results the run summary; the config,
data and evaluation reports and plots are saved as run files and the adapter as a
``model`` artefact. The run id is kept in ``RUN/tracking/wandb.json`` and a
resumed run continues the same W&B run (``resume="allow"``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tunesmith import hookimpl

Kind = Literal["config", "data_report", "eval_report", "plot", "adapter", "model"]


class WandbRun:
    def __init__(self, run: Any, *, kinds: set[str], run_dir: Path) -> None:
        self.run = run
        self.kinds = kinds
        self.run_dir = run_dir
        self.last_step = -1

    def log_params(self, params: dict) -> None:
        self.run.config.update(params, allow_val_change=True)

    def log_metrics(self, metrics: dict, step: int) -> None:
        from tunesmith.core.tracking import numeric

        values = numeric(metrics)
        if not values:
            return
        step = int(step)
        if step < self.last_step:  # W&B steps only go forward; a resumed run's replayed rows are dropped by W&B anyway
            return
        self.run.log(values, step=step)
        self.last_step = step

    def log_artifact(self, path: Any, kind: str) -> None:
        if kind not in self.kinds:
            return
        import wandb

        p = Path(path)
        if p.is_dir():
            art = wandb.Artifact(f"{self.run.id}-{kind}", type="model" if kind in ("adapter", "model") else kind)
            art.add_dir(str(p))
            self.run.log_artifact(art)
        else:
            self.run.save(str(p), base_path=str(p.parent), policy="now")

    def close(self, status: str, result: dict | None) -> None:
        from tunesmith.core.tracking import flatten, numeric

        if result:
            self.run.summary.update(numeric(flatten(result)))
        self.run.finish(exit_code=0 if status == "finished" else 1)


class WandbLogger:
    name = "wandb"
    description = "Weights & Biases (offline by default: no account; wandb sync uploads later)"

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        mode: Literal["offline", "online", "disabled"] = Field(
            "offline", description="offline (default; files under RUN/wandb), online (needs a login) or disabled.")
        project: str | None = Field(None, description="W&B project. Default: $WANDB_PROJECT, else the config's name, else 'tunesmith'.")
        entity: str | None = Field(None, description="W&B entity (team or user); default: yours / $WANDB_ENTITY.")
        run_name: str | None = Field(None, description="Run name. Default: the config's name, else the run directory's name.")
        group: str | None = Field(None, description="Run group (sweeps put their trials in one).")
        tags: list[str] = Field(default_factory=list, description="Run tags.")
        dir: str | None = Field(None, description="Where W&B writes its files (default: the run directory).")
        artifacts: list[Kind] = Field(
            default_factory=lambda: ["config", "data_report", "eval_report", "plot", "adapter"],
            description="Which kinds of run files to save (add 'model' for merged models).")

    def open(self, run: Any, options: Any, resume: bool) -> WandbRun:
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")  # no crash reports leave the machine
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        from tunesmith.core.tracking import read_state, write_state

        options = options or self.Options()
        cfg = run.config
        run_dir = Path(run.run_dir)
        wdir = Path(options.dir) if options.dir else run_dir
        wdir.mkdir(parents=True, exist_ok=True)
        saved = read_state(run_dir, "wandb") if resume else None
        run_id = saved.get("id") if saved else None
        name = getattr(cfg, "name", None)
        settings = wandb.Settings(
            silent=True, console="off", x_disable_stats=True, disable_git=True, save_code=False,
            x_disable_machine_info=True, disable_job_creation=True,
        )
        wrun = wandb.init(
            mode=options.mode, project=options.project or os.environ.get("WANDB_PROJECT") or name or "tunesmith",
            entity=options.entity, name=options.run_name or name or run_dir.name, group=options.group,
            tags=list(options.tags) or None, dir=str(wdir), id=run_id, resume="allow" if run_id else None,
            reinit="create_new", settings=settings,
        )
        write_state(run_dir, "wandb", {"id": wrun.id, "mode": options.mode, "project": wrun.project,
                                       "dir": str(getattr(wrun, "dir", "") or "")})
        return WandbRun(wrun, kinds=set(options.artifacts), run_dir=run_dir)


@hookimpl
def register_loggers(register: Any) -> None:
    register(WandbLogger())
