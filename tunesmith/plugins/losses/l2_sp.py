"""L2-SP: a plain L2 pull of the trainable parameters towards their starting values.

``penalty = sum_i (theta_i - theta0_i)^2`` (the config's ``weight`` is the
coefficient). The simpler sibling of ``ewc``: every weight counts the same.
``theta0`` is the start of training, or a previous run's weights (``anchor:``);
it is stored as ``RUN/l2_sp/anchor.safetensors`` so a resumed run pulls towards
the same point.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tunesmith import hookimpl


class L2SPOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    anchor: str = Field(
        "start",
        description="start = the trainable parameters at the start of training; or a previous run "
        "directory / adapter / model folder whose weights are the anchor.",
    )
    init_from_anchor: bool = Field(
        True, description="With a previous run as anchor, start training from its weights."
    )


def l2_penalty(model: Any, anchor: dict[str, Any]) -> Any:
    """``sum_i (theta_i - theta0_i)^2`` over the anchored trainable parameters."""
    import torch

    from tunesmith.plugins.losses.ewc import trainable_parameters

    params = trainable_parameters(model)
    total = None
    for n, a in anchor.items():
        p = params[n]
        if a.device != p.device:
            a = anchor[n] = a.to(p.device)
        term = ((p.float() - a) ** 2).sum()
        total = term if total is None else total + term
    return total if total is not None else torch.zeros(())


class L2SP:
    name = "l2_sp"
    description = "L2-SP: sum (theta - theta0)^2, a plain pull towards the starting (or a previous run's) weights."
    requires = None
    Options = L2SPOptions

    def setup(self, model: Any, options: L2SPOptions, context: Any) -> None:
        from tunesmith.plugins.losses.ewc import (
            is_resume,
            load_tensors,
            prepare_anchor,
            save_tensors,
            state_dir,
            trainable_parameters,
        )

        folder = state_dir(context, "l2_sp")
        anchor_file = folder / "anchor.safetensors" if folder else None
        anchor = None
        if anchor_file is not None and is_resume(context) and anchor_file.exists():
            anchor = load_tensors(anchor_file)
            if sorted(anchor) != sorted(trainable_parameters(model)):
                anchor = None
        if anchor is None:
            anchor = prepare_anchor(model, options.anchor, options.init_from_anchor, context)
            if anchor_file is not None:
                save_tensors(anchor_file, anchor, {"kind": "l2_sp-anchor"})
        state = context.state if context is not None else {}
        state["l2_sp"] = anchor

    def compute(self, model: Any, batch: Any, options: L2SPOptions, context: Any) -> tuple[Any, dict]:
        state = context.state if context is not None else {}
        if "l2_sp" not in state:
            self.setup(model, options, context)
        return l2_penalty(model, state["l2_sp"]), {}


@hookimpl
def register_losses(register: Any) -> None:
    register(L2SP())
