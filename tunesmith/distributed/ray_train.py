"""``training.distributed.backend: ray``: the same training session on Ray Train workers.

The driver (the ``tunesmith train`` process) checks the config, joins or starts a
Ray cluster (``address``), and runs a ``ray.train.torch.TorchTrainer`` with
``num_workers`` workers. Ray forms the torch process group (gloo on CPU, NCCL with
``use_gpu``) and gives each worker the environment torchrun would (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``), so inside each
worker transformers' Trainer finds an ordinary DDP launch: the data is sharded as
under torchrun, the loss is token-weighted across workers, rank 0 writes the run
directory, checkpoints go to ``RUN/checkpoints``.

Failure recovery: when a worker dies, Ray restarts the whole group
(``FailureConfig(max_failures)``); the new workers know they are a restart (the
driver's launch record counts each rank's starts) and the session resumes from the
run's last *complete* checkpoint written by this launch (its ordinary ``--resume``).
After each complete checkpoint the workers also report a small pointer checkpoint
to Ray (``storage``, default ``RUN/ray``), so Ray's own record of the run names it. A user error in a worker (a bad config, an
unsupported combination) is not retried into a loop: the first worker that hits it
records it, later attempts stop at once, and the driver raises it as one line.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from tunesmith import hookimpl
from tunesmith.core.launch import LaunchError, config_payload

log = logging.getLogger("tunesmith.ray")

#: environment passed to the workers (a remote cluster does not inherit the driver's)
_ENV_PREFIXES = ("TUNESMITH_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "OMP_WAIT_POLICY", "PYTHONHASHSEED")


def _import_ray() -> Any:
    try:
        import ray
        import ray.train  # noqa: F401
        import ray.train.torch  # noqa: F401
    except ImportError as exc:
        raise LaunchError(f"training.distributed.backend: ray needs Ray Train ({exc.name or exc} is missing)",
                          hint="pip install 'tunesmith[ray]'") from None
    return ray


def worker_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES) and k != "TUNESMITH_LAUNCHED"}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("TUNESMITH_NO_PROGRESS", "1")  # a tqdm bar does not survive Ray's line-wise log forwarding
    env.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # Ray Train would log every print a second time
    return env


def quiet_ray_process() -> None:
    """Ray's ``worker_process_setup_hook`` for the run: without Ray's dashboard the
    placement-group cleaner warns every second that it cannot ask the state API;
    that says nothing about the training."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def _launch_state_class(ray: Any) -> Any:
    @ray.remote(num_cpus=0)
    class LaunchState:
        """The driver's record of one launch: worker-group attempts and the first user error."""

        def __init__(self) -> None:
            self.starts: dict[int, int] = {}
            self.saved_steps: list[int] = []
            self.error: dict | None = None

        def started(self, rank: int) -> int:
            """This rank's attempt number (1 = the first worker group)."""
            self.starts[rank] = self.starts.get(rank, 0) + 1
            return self.starts[rank]

        def failed(self, rank: int, message: str, exit_code: int) -> None:
            if self.error is None:
                self.error = {"rank": rank, "message": message, "exit_code": exit_code}

        def saved(self, step: int) -> None:
            self.saved_steps.append(step)

        def has_saved(self) -> bool:
            return bool(self.saved_steps)

        def finished(self, result: dict, worker_started_at: float) -> None:
            self.result, self.worker_started_at = result, worker_started_at

        def report(self) -> dict:
            return {"attempts": max(self.starts.values(), default=0), "error": self.error,
                    "result": getattr(self, "result", None), "worker_started_at": getattr(self, "worker_started_at", None)}

    return LaunchState


# --------------------------------------------------------------------------- driver
def run_ray(cfg: Any, registries: Any = None, *, resume: bool = False, run_dir: str | Path | None = None) -> dict:
    """Train on Ray Train workers; returns rank 0's result plus ``launch`` (back-end,
    workers, attempts, wall and start-up seconds)."""
    ray = _import_ray()
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from tunesmith.core.errors import TunesmithError
    from tunesmith.core.io import atomic_write_json
    from tunesmith.core.session import TrainingSession

    TrainingSession(cfg, registries, resume=resume, run_dir=run_dir).check()  # config errors before Ray starts
    d = cfg.training.distributed
    payload = config_payload(cfg, registries, resume=resume, run_dir=run_dir)
    root = Path(payload["run_dir"])
    env = worker_env()
    payload["env"] = env
    payload["launched_at"] = time.time()
    t0 = time.time()
    started_here = not ray.is_initialized()
    if started_here:
        try:
            ray.init(address=d.address, include_dashboard=False, logging_level=logging.WARNING,
                     runtime_env={"env_vars": env,
                                  "worker_process_setup_hook": "tunesmith.distributed.ray_train.quiet_ray_process"})
        except Exception as exc:  # noqa: BLE001 - a cluster that cannot be joined is a launch problem
            last = f"{type(exc).__name__}: {exc}".strip().splitlines()[-1]
            where = f"the Ray cluster at {d.address}" if d.address else "a local Ray cluster"
            raise LaunchError(f"could not start or join {where}: {last}",
                              hint="check training.distributed.address (`ray status` on the head node)") from None
    try:
        state = _launch_state_class(ray).remote()
        payload["launch_state"] = state
        resources = dict(d.resources_per_worker or ({"CPU": 1, "GPU": 1} if d.use_gpu else {"CPU": 1}))
        storage = str(root / "ray") if not d.storage else d.storage if "://" in d.storage else str(cfg.resolve_path(d.storage))
        trainer = TorchTrainer(
            train_worker,
            train_loop_config=payload,
            scaling_config=ScalingConfig(num_workers=d.num_workers, use_gpu=d.use_gpu, resources_per_worker=resources),
            torch_config=TorchConfig(backend="nccl" if d.use_gpu else "gloo"),
            run_config=RunConfig(
                name=f"{root.name}-{uuid.uuid4().hex[:8]}",  # a fresh Ray run: never a stale run's checkpoint
                storage_path=storage,
                failure_config=FailureConfig(max_failures=d.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
            ),
        )
        t_fit = time.time()
        error: BaseException | None = None
        try:
            result = trainer.fit()
        except Exception as exc:  # noqa: BLE001 - reported below as one line
            error, result = exc, None
        report = ray.get(state.report.remote())
    finally:
        if started_here:
            ray.shutdown()
    if report["error"] is not None or error is not None or result is None:  # what the launch did, also when it failed
        atomic_write_json(root / "launch.json", {"backend": "ray", "workers": d.num_workers,
                                                 "attempts": report["attempts"], "error": report["error"] or _last_line(error),
                                                 "wall_s": round(time.time() - t0, 2), "storage": storage,
                                                 "address": d.address})
    if report["error"] is not None:
        e = report["error"]
        err = TunesmithError(f"{e['message']} (rank {e['rank']} on Ray)")
        err.exit_code = int(e["exit_code"])
        raise err
    if error is not None or result is None:
        raise LaunchError(f"Ray training failed after {report['attempts']} attempt(s): {_last_line(error)}",
                          hint=f"the workers' output is in {root / 'logs'} and Ray's in {d.storage or root / 'ray'}")
    out = dict(report["result"] or {})
    if not out:
        out = json.loads((root / "train_result.json").read_text(encoding="utf-8"))
    wall = time.time() - t0
    launch = {"backend": "ray", "workers": d.num_workers, "attempts": report["attempts"], "wall_s": round(wall, 2),
              "connect_s": round(t_fit - t0, 2), "storage": storage, "address": d.address}
    if report["worker_started_at"]:  # Ray's controller and (the last) worker group up, the session about to start
        launch["workers_up_s"] = round(float(report["worker_started_at"]) - t_fit, 2)
    atomic_write_json(root / "launch.json", launch)
    out["launch"] = launch
    return out


def _last_line(exc: BaseException | None) -> str:
    if exc is None:
        return "no result"
    causes = [exc]
    for attr in ("worker_failures",):  # ray.train WorkerGroupError: rank -> error
        failures = getattr(exc, attr, None)
        if isinstance(failures, dict) and failures:
            causes = list(failures.values())
    lines = [ln for ln in f"{type(causes[0]).__name__}: {causes[0]}".splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


# --------------------------------------------------------------------------- workers
def train_worker(payload: dict) -> None:
    """The function every Ray Train worker runs: the same session as under torchrun."""
    import ray
    import ray.train as rt

    from tunesmith.core.errors import TunesmithError
    from tunesmith.core.plugins import register_plugin
    from tunesmith.distributed.worker import prepare_process

    t_start = time.time()
    ctx = rt.get_context()
    for key, value in (("RANK", ctx.get_world_rank()), ("WORLD_SIZE", ctx.get_world_size()),
                       ("LOCAL_RANK", ctx.get_local_rank()), ("LOCAL_WORLD_SIZE", ctx.get_local_world_size()),
                       ("NODE_RANK", ctx.get_node_rank())):
        os.environ[key] = str(value)
    rank = ctx.get_world_rank()
    state = payload.get("launch_state")
    attempt = 1
    if state is not None:
        attempt = ray.get(state.started.remote(rank))
        earlier = ray.get(state.report.remote())["error"]
        if earlier is not None:
            # a user error of the attempt before: it would only repeat. Every worker of
            # this fresh group ends here alike (no collective is pending), so the run
            # ends without further restarts and the driver raises the recorded error.
            return
    # Ray restarted the group after a failure: continue from this launch's last complete
    # checkpoint (one written before the launch belongs to an earlier run and is not used)
    resume = bool(payload["resume"])
    if attempt > 1 and not resume:
        resume = bool(ray.get(state.has_saved.remote())) or _checkpoint_since(Path(payload["run_dir"]), payload["launched_at"])
    root = logging.getLogger()
    for handler in list(root.handlers):  # Ray's own stderr/file handlers: the run's log routing replaces them
        if type(handler).__module__.startswith("ray."):
            root.removeHandler(handler)
    try:
        cfg = prepare_process(payload, "ray")
        register_plugin(RayCheckpointReports(state), "ray.checkpoints")
        from tunesmith.core.session import train

        if attempt > 1 and rank == 0:
            print(f"ray: attempt {attempt} (Ray restarted the workers after a failure); "
                  + ("resuming from the last complete checkpoint" if resume else "no checkpoint yet: from the start"),
                  flush=True)
        result = train(cfg, resume=resume, run_dir=payload["run_dir"])
    except TunesmithError as exc:
        if state is not None:
            ray.get(state.failed.remote(rank, str(exc), int(getattr(exc, "exit_code", 1))))
        raise
    if rank == 0 and state is not None:
        ray.get(state.finished.remote(json.loads(json.dumps(result, default=str)), t_start))


def _checkpoint_since(run_dir: Path, since: float) -> bool:
    from tunesmith.core.training import last_checkpoint

    cp = last_checkpoint(run_dir)
    return cp is not None and (cp / "trainer_state.json").stat().st_mtime >= since - 1.0


class RayCheckpointReports:
    """An in-process plugin in each Ray worker: after every complete checkpoint all
    workers report to Ray, rank 0 with a pointer checkpoint (``tunesmith.json``:
    which ``checkpoint-N`` of which run) and the driver's launch record notes the step."""

    def __init__(self, state: Any = None) -> None:
        self.state = state

    @hookimpl
    def before_train(self, run: Any) -> None:
        trainer = run.state.get("trainer")
        if trainer is not None:
            trainer.add_callback(_report_callback(run.run_dir, self.state))


def _report_callback(run_dir: Path, launch_state: Any = None) -> Any:
    import ray.train as rt
    from transformers import TrainerCallback

    class ReportCheckpoints(TrainerCallback):
        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            step = int(state.global_step)
            name = f"checkpoint-{step}"
            metrics = {"step": step, "checkpoint": name}
            if state.is_world_process_zero:
                if launch_state is not None:
                    import ray

                    ray.get(launch_state.saved.remote(step))
                with tempfile.TemporaryDirectory(prefix="tunesmith-ray-") as tmp:
                    (Path(tmp) / "tunesmith.json").write_text(
                        json.dumps({"run_dir": str(run_dir), "checkpoint": name, "step": step}), encoding="utf-8")
                    _report(rt, metrics, rt.Checkpoint.from_directory(tmp), name)
            else:
                _report(rt, metrics, None, name)

    return ReportCheckpoints()


def _report(rt: Any, metrics: dict, checkpoint: Any, name: str) -> None:
    try:
        rt.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
    except TypeError:  # Ray before checkpoint_dir_name: Ray names the folder itself
        rt.report(metrics, checkpoint=checkpoint)
