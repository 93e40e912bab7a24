"""Launches that cannot go silently wrong, and the distributed back-end dispatch.

Two entry points, both called by the training session:

* :func:`tunesmith.distributed.dispatch` (the ``launch_training`` hook, from :func:`tunesmith.core.session.train`): with
  ``training.distributed.backend: torchrun`` or ``ray`` the session is not run in
  this process but in ``num_workers`` processes tunesmith starts itself (torchrun
  on this machine, or Ray Train workers, :mod:`tunesmith.distributed`); the
  result is rank 0's. ``none`` (the default) runs here, which is also what every
  process an outside launcher started does (``torchrun``, ``accelerate launch``).
* :func:`check_launch` (first thing in ``TrainingSession.start()``): when the
  environment says there are several processes (``WORLD_SIZE`` > 1), this process
  must really be one of a process group of that size, and what the launcher asked
  for must be what accelerate will do. Otherwise it stops before anything loads,
  with one line naming the launcher setting, instead of training N unconnected
  copies into one run directory. It also sends every rank but 0's output (stdout,
  stderr, C-level writes included) to ``RUN/logs/rank-N.out``, so the terminal
  shows rank 0 only, and writes ``RUN/ranks/launch-N.json`` (who launched it,
  the process-group back-end, accelerate's distributed type, host, pid).

What needs the model or the trainer (an objective that trains in its own loop, a
PEFT method that changes the trained set during training) is refused before the
first step by the ``launch.guard`` plugin (``tunesmith/plugins/launchers/guard.py``).
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

from tunesmith.core.errors import TunesmithError
from tunesmith.core.ranks import rank, world_size

#: set in the processes tunesmith started itself (``torchrun`` or ``ray``): they run the session, never dispatch
ENV_LAUNCHED = "TUNESMITH_LAUNCHED"

#: accelerate's distributed types that FSDP / DeepSpeed run on (all accelerator devices; not MULTI_CPU, not NO)
_SHARDING_TYPES = ("MULTI_GPU", "MULTI_XPU", "MULTI_NPU", "MULTI_HPU", "MULTI_MLU", "MULTI_MUSA", "MULTI_SDAA",
                   "MULTI_NEURON", "XLA")


class LaunchError(TunesmithError):
    """The processes were started in a way that would train wrongly (or not at all)."""

    exit_code = 5


# --------------------------------------------------------------------------- who started us
def launcher() -> str:
    """Who started this process, from the environment: ``Ray Train``, ``torchrun (training.distributed)`` (tunesmith's
    own), ``accelerate launch``, ``torchrun``, ``mpirun``, ``WORLD_SIZE set by hand``
    or ``none``."""
    env = os.environ
    own = env.get(ENV_LAUNCHED)
    if own:
        return {"ray": "Ray Train", "torchrun": "torchrun (training.distributed)"}.get(own, own)
    if any(k.startswith("ACCELERATE_") and k not in ("ACCELERATE_TORCH_DEVICE",) for k in env) and (
        "ACCELERATE_MIXED_PRECISION" in env or "ACCELERATE_USE_CPU" in env or "ACCELERATE_DYNAMO_BACKEND" in env
    ):
        return "accelerate launch"
    if "TORCHELASTIC_RUN_ID" in env:
        return "torchrun"
    if "OMPI_COMM_WORLD_SIZE" in env or "PMI_SIZE" in env:
        return "mpirun"
    if "WORLD_SIZE" in env:
        return "WORLD_SIZE set by hand"
    return "none"


def requested_sharding() -> str | None:
    """``FSDP`` or ``DeepSpeed`` when ``accelerate launch`` (its config file or flags) asked for it."""
    env = os.environ
    if env.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "FSDP"
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "DeepSpeed"
    return None


# --------------------------------------------------------------------------- the check
def check_launch(cfg: Any, run_root: Path) -> dict:
    """Stop (LaunchError) when this process cannot be what its launcher says it is.

    Single process: only a sharding request that cannot hold (FSDP / DeepSpeed on
    CPU) is refused. Several processes (``WORLD_SIZE`` > 1): rank > 0 output goes to
    ``RUN/logs/rank-N.out``; the process group is formed now (the Trainer reuses it)
    and must have ``WORLD_SIZE`` members and a distributed type other than ``NO``;
    FSDP / DeepSpeed must be something accelerate will really do here. Returns what
    was found (also written to ``RUN/ranks/launch-N.json``).
    """
    ws, rk, who = world_size(), rank(), launcher()
    sharding = requested_sharding()
    if ws <= 1:
        if sharding:
            _refuse_sharding_here(sharding, who, ws, device=_device_type())
        return {"world_size": 1, "launcher": who}
    if rk != 0:
        redirect_output(run_root / "logs" / f"rank-{rk}.out")
    try:
        return _check_group(run_root, ws, rk, who, sharding)
    except LaunchError as exc:
        if rk != 0:  # every rank finds the same; let rank 0 say it before the launcher ends the others
            import time

            sys.stderr.write(f"error: {exc}\n")  # into RUN/logs/rank-N.out, in case this rank is ended first
            sys.stderr.flush()
            time.sleep(5)
        raise


def _check_group(run_root: Path, ws: int, rk: int, who: str, sharding: str | None) -> dict:
    info: dict[str, Any] = {"rank": rk, "world_size": ws, "launcher": who, "host": socket.gethostname(),
                            "pid": os.getpid(), "local_rank": int(os.environ.get("LOCAL_RANK", "-1"))}
    state = _form_process_group(ws, who)
    import torch.distributed as dist

    dtype = str(state.distributed_type).split(".")[-1]
    info["distributed_type"] = dtype
    info["process_group"] = dist.get_backend() if dist.is_initialized() else None
    if dtype == "NO" or not dist.is_initialized():
        raise LaunchError(
            f"{who} started {ws} processes (WORLD_SIZE={ws}), but accelerate formed no process group "
            f"(DistributedType.NO): they would train {ws} unconnected copies into one run directory",
            hint=_fix_hint(who, ws),
        )
    if dist.get_world_size() != ws:
        raise LaunchError(
            f"WORLD_SIZE={ws} but the process group has {dist.get_world_size()} members ({who})",
            hint=_fix_hint(who, ws),
        )
    if sharding:
        info["requested"] = sharding
        if dtype not in _SHARDING_TYPES:
            _refuse_sharding_here(sharding, who, ws, device=_device_type(), got=dtype)
    write_launch_info(run_root, info)
    return info


def _form_process_group(ws: int, who: str) -> Any:
    """accelerate's PartialState as the Trainer will build it (cpu when no CUDA), which
    joins the process group (Ray's, when Ray formed it already)."""
    import torch
    from accelerate import PartialState

    try:
        return PartialState(cpu=not torch.cuda.is_available())
    except Exception as exc:  # noqa: BLE001 - any failure to join is the launch's fault
        last = f"{type(exc).__name__}: {exc}".strip().splitlines()[-1]
        raise LaunchError(f"WORLD_SIZE={ws} ({who}) but this process could not join a process group: {last}",
                          hint=_fix_hint(who, ws)) from None


def _device_type() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _refuse_sharding_here(sharding: str, who: str, ws: int, *, device: str, got: str | None = None) -> None:
    if device != "cpu" and got is None:
        return
    setting = "distributed_type: FSDP" if sharding == "FSDP" else "distributed_type: DEEPSPEED"
    fallback = f"accelerate would run {ws} plain DDP copies (DistributedType.{got})" if got and ws > 1 else \
        "accelerate would train without it"
    raise LaunchError(
        f"{who} asked for {sharding} ({setting}), but {sharding} does not shard on "
        f"{'CPU (use_cpu: true, or no GPU)' if device == 'cpu' else got}: {fallback}",
        hint=f"on CPU use `torchrun --nproc_per_node={max(ws, 2)}` or training.distributed.backend: ray; "
             f"{sharding} needs GPUs",
    )


def _fix_hint(who: str, ws: int) -> str:
    if who == "accelerate launch":
        return (f"check the accelerate config's distributed_type and use_cpu; on CPU use "
                f"`torchrun --nproc_per_node={ws}` (accelerate launch --cpu starts one process)")
    if who == "WORLD_SIZE set by hand":
        return "WORLD_SIZE is set by hand: start the processes with torchrun, accelerate launch or Ray, which also set RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT"
    if who == "mpirun":
        return "mpirun needs torch with MPI, or start the processes with torchrun"
    return f"every process must reach MASTER_ADDR:MASTER_PORT and see WORLD_SIZE={ws}"


def write_launch_info(run_root: Path, info: dict) -> Path:
    from tunesmith.core.io import atomic_write_json

    path = Path(run_root) / "ranks" / f"launch-{info.get('rank', rank())}.json"
    old: dict = {}
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            old = {}
    if old.get("pid") != info.get("pid", old.get("pid")):
        old = {}  # an earlier process (a restarted worker group): start afresh
    return atomic_write_json(path, {**old, **info})


# --------------------------------------------------------------------------- per-rank output
_redirected: dict[str, Any] = {}


def redirect_output(path: Path) -> Path:
    """Send this process's stdout and stderr (file descriptors 1 and 2, so C-level writes
    and child processes too) to ``path`` (appended). Once per process."""
    if _redirected.get("path") == str(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    if "stderr" not in _redirected:
        try:
            _redirected["stderr"] = os.dup(2)  # the terminal, for a last word on failure
        except OSError:
            pass
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    _redirected["path"] = str(path)
    return path


# --------------------------------------------------------------------------- payloads
def config_payload(cfg: Any, registries: Any = None, *, resume: bool, run_dir: str | Path | None) -> dict:
    """What a worker process needs to rebuild the same config and run the same session
    (the plugins disabled here, by the config or ``--disable``, stay disabled there)."""
    from tunesmith.core.rundir import RunDir

    root = Path(run_dir) if run_dir else RunDir.for_config(cfg).root
    disabled = set(cfg.plugins.disable)
    if registries is not None:
        disabled |= {n for n, p in getattr(registries, "plugins", {}).items() if getattr(p, "status", "") == "disabled"}
    return {
        "config": cfg.model_dump(mode="json", exclude_unset=True),  # what the file and overrides said
        "source": cfg.source,
        "base_dir": str(Path(cfg.base_dir).resolve()),
        "run_dir": str(root.resolve()),
        "resume": bool(resume),
        "disable": sorted(disabled),
    }


def config_from_payload(payload: dict) -> Any:
    """The config :func:`config_payload` describes (in a worker process)."""
    from tunesmith.core.config import validate_config
    from tunesmith.core.plugins import ENV_DISABLE

    if payload.get("disable"):
        os.environ[ENV_DISABLE] = ",".join(payload["disable"])
    return validate_config(payload["config"], source=payload["source"], base_dir=Path(payload["base_dir"]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
