"""Back-ends that start the training processes for tunesmith itself
(``training.distributed.backend``): :mod:`.torchrun` (processes on this machine)
and :mod:`.ray_train` (Ray Train workers on a local or remote Ray cluster). Both run
the same :class:`~tunesmith.core.session.TrainingSession` in every process through
:mod:`.worker`; :func:`dispatch` picks one, as the ``launch_training`` hook (entry point
``launch.distributed``): core asks the hook and never imports this package."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tunesmith import hookimpl
from tunesmith.core.launch import ENV_LAUNCHED, LaunchError, launcher
from tunesmith.core.ranks import world_size


def dispatch(cfg: Any, registries: Any = None, *, resume: bool = False, run_dir: str | Path | None = None) -> dict | None:
    """Run the session on the configured back-end and return rank 0's result, or None
    when it runs in this process (``backend: none``, or this process is a worker)."""
    d = cfg.training.distributed
    if d.backend == "none" or os.environ.get(ENV_LAUNCHED):
        return None
    outer = launcher()
    if d.backend == "torchrun":
        if world_size() > 1:
            return None  # already one of torchrun's (or accelerate's) processes: train as one
        from tunesmith.distributed.torchrun import run_torchrun

        return run_torchrun(cfg, registries, resume=resume, run_dir=run_dir)
    if d.backend == "ray":
        if world_size() > 1:
            raise LaunchError(
                f"training.distributed.backend is ray, but {outer} already started {world_size()} processes",
                hint="start `tunesmith train` once, without torchrun/accelerate launch: Ray starts the workers",
            )
        from tunesmith.distributed.ray_train import run_ray

        return run_ray(cfg, registries, resume=resume, run_dir=run_dir)
    raise LaunchError(f"unknown training.distributed.backend '{d.backend}'")  # pragma: no cover - validated


@hookimpl
def launch_training(cfg: Any, registries: Any, resume: bool, run_dir: Any) -> dict | None:
    return dispatch(cfg, registries, resume=resume, run_dir=run_dir)
