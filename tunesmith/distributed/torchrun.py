"""``training.distributed.backend: torchrun``: tunesmith starts ``num_workers``
processes on this machine with torchrun (``python -m torch.distributed.run``) and
returns rank 0's result. The same as typing
``torchrun --nproc_per_node=N $(which tunesmith) train CONFIG`` yourself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tunesmith.core.launch import ENV_LAUNCHED, LaunchError, config_payload, free_port


def run_torchrun(cfg: Any, registries: Any = None, *, resume: bool = False, run_dir: str | Path | None = None) -> dict:
    from tunesmith.core.io import atomic_write_json
    from tunesmith.core.session import TrainingSession

    TrainingSession(cfg, registries, resume=resume, run_dir=run_dir).check()  # config errors before N processes start
    n = cfg.training.distributed.num_workers
    payload = config_payload(cfg, registries, resume=resume, run_dir=run_dir)
    root = Path(payload["run_dir"])
    fd, path = tempfile.mkstemp(prefix="tunesmith-launch-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(payload, fh)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}", "--nnodes=1",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", "tunesmith.distributed.worker", path]
    env = dict(os.environ, **{ENV_LAUNCHED: "torchrun"})
    t0 = time.time()
    try:
        rc = subprocess.call(cmd, env=env)
    finally:
        os.unlink(path)
    wall = time.time() - t0
    if rc != 0:
        raise LaunchError(
            f"torchrun: the {n} training processes ended with exit code {rc}",
            hint=f"rank 0's error is above; the other ranks' output is in {root / 'logs'}/rank-N.out",
        )
    result = json.loads((root / "train_result.json").read_text(encoding="utf-8"))
    launch = {"backend": "torchrun", "workers": n, "wall_s": round(wall, 2)}
    atomic_write_json(root / "launch.json", launch)
    result["launch"] = launch
    return result
