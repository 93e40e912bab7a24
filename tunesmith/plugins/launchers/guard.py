"""``launch.guard``: what cannot run across processes is refused before the first step.

A lifecycle-hook plugin (``before_train``). It does nothing in a single process.
With several processes (``WORLD_SIZE`` > 1: torchrun, accelerate launch, Ray):

* an objective that trains in its own loop instead of through a Trainer (PPO) is
  refused: such a loop does not synchronise gradients, so every process would
  train alone. An objective whose loop does synchronise sets
  ``run.state["distributed_loop"] = True`` before ``before_train``;
* the Trainer must really be distributed as launched: accelerate's distributed
  type is not ``NO``, the world sizes agree, and FSDP / DeepSpeed asked for by
  ``accelerate launch`` is on (``RUN/ranks/launch-N.json`` records what ran);
* the set of trained parameters must stay what DDP wrapped: a PEFT method that
  freezes or unfreezes parameters during training (gradual unfreezing,
  ``peft.method: freeze`` with ``unfreeze_every``) is refused at train begin,
  before the first step, with the reason.

Disable it (``plugins.disable: [launch.guard]``) only for a plugin that handles
these cases itself.
"""

from __future__ import annotations

from typing import Any

from tunesmith import hookimpl


def _refuse(message: str, hint: str) -> None:
    from tunesmith.core.launch import LaunchError

    raise LaunchError(message, hint=hint)


class LaunchGuard:
    name = "launch.guard"

    @hookimpl(tryfirst=True)
    def before_train(self, run: Any) -> None:
        from tunesmith.core.launch import launcher, requested_sharding, write_launch_info
        from tunesmith.core.ranks import rank, world_size

        ws = world_size()
        if ws <= 1:
            return
        who = launcher()
        objective = run.state.get("objective") or "this objective"
        trainer = run.state.get("trainer")
        one_process = "run it in one process (without torchrun, accelerate launch or training.distributed)"
        if trainer is None:
            if run.state.get("distributed_loop"):
                return
            _refuse(f"objective '{objective}' trains in its own loop, not through a Trainer, and that loop does not "
                    f"synchronise gradients: under {who} each of the {ws} processes would train alone",
                    one_process)
        acc = getattr(trainer, "accelerator", None)
        dtype = str(getattr(acc, "distributed_type", "NO")).split(".")[-1]
        procs = int(getattr(acc, "num_processes", 1) or 1)
        info = {"rank": rank(), "trainer_distributed_type": dtype, "trainer_processes": procs,
                "fsdp": bool(getattr(trainer, "is_fsdp_enabled", False)),
                "deepspeed": bool(getattr(trainer, "is_deepspeed_enabled", False))}
        if run.run_dir is not None:
            import os

            write_launch_info(run.run_dir, {**info, "pid": os.getpid()})
        if dtype == "NO" or procs != ws:
            _refuse(f"{who} started {ws} processes, but the Trainer runs {procs} (DistributedType.{dtype}): "
                    f"they would train unconnected copies", "check the launcher's distributed settings")
        asked = requested_sharding()
        if asked == "FSDP" and not info["fsdp"] or asked == "DeepSpeed" and not info["deepspeed"]:
            _refuse(f"{who} asked for {asked}, but the Trainer runs DistributedType.{dtype} without it",
                    f"{asked} needs GPUs and a matching accelerate config")
        trainer.add_callback(_fixed_trainables(run, trainer, ws, who, one_process))


def _fixed_trainables(run: Any, trainer: Any, ws: int, who: str, one_process: str) -> Any:
    """A callback (added last, so it sees what the PEFT method's callbacks did at train
    begin) that stops when the set of parameters with gradients changes."""
    from transformers import TrainerCallback

    model = trainer.model

    def trained() -> set[str]:
        return {n for n, p in model.named_parameters() if p.requires_grad}

    wrapped = trained()  # what DDP will wrap (nothing changes it before train begins)
    method = getattr(getattr(run.config, "peft", None), "method", None) or "the PEFT method"

    class FixedTrainables(TrainerCallback):
        def _check(self, step: int) -> None:
            now = trained()
            if now == wrapped:
                return
            frozen, thawed = len(wrapped - now), len(now - wrapped)
            what = ", ".join(x for x in (f"{frozen} tensors frozen" if frozen else "",
                                         f"{thawed} unfrozen" if thawed else "") if x)
            _refuse(f"the PEFT method '{method}' changes which parameters train during training ({what} at step "
                    f"{step}, e.g. gradual unfreezing): DDP fixes the trained set when it wraps the model, so this "
                    f"cannot run in {ws} processes ({who})", one_process)

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self._check(int(state.global_step))

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self._check(int(state.global_step))

    return FixedTrainables()


#: the plugin object the entry point names (``tunesmith.plugins.launchers.guard:guard``)
guard = LaunchGuard()
