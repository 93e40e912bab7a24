"""Freezing: train only the top N transformer blocks, with optional gradual unfreezing.

Gradual unfreezing (ULMFiT-style) starts with ``top_n`` blocks and unfreezes one
more block, from the top down, every ``unfreeze_every`` optimiser steps until
``max_unfrozen`` blocks train. Every block that will ever train is in the optimiser
from the start; a block still frozen has no gradient, so AdamW leaves it untouched.
The trained tensors (those blocks, and the final norm) are saved as
``freeze_weights.safetensors``; loading puts them on the base model, which makes the
result a plain model (nothing to merge).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tunesmith import hookimpl

WEIGHTS = "freeze_weights.safetensors"
CONFIG = "freeze_config.json"


class FreezeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    top_n: int = Field(2, ge=0, description="Blocks (from the top) that train from the start.")
    train_norm: bool = Field(True, description="Train the final layer norm.")
    train_lm_head: bool = Field(False, description="Train the output head (with tied embeddings this trains the embeddings too).")
    unfreeze_every: int | None = Field(None, ge=1, description="Gradual unfreezing: one more block every this many steps.")
    max_unfrozen: int | None = Field(None, ge=1, description="Stop unfreezing at this many blocks (default: all).")


def _plan(model: Any, options: FreezeOptions) -> tuple[list[Any], int, int]:
    from tunesmith.plugins.peft._layers import block_list

    _, blocks = block_list(model)
    n = len(blocks)
    start = min(options.top_n, n)
    final = start
    if options.unfreeze_every:
        final = min(options.max_unfrozen or n, n)
    return list(blocks), start, max(start, final)


def _set_blocks(blocks: list[Any], k: int) -> None:
    """The top k blocks train; the rest are frozen."""
    n = len(blocks)
    for i, b in enumerate(blocks):
        on = i >= n - k
        for p in b.parameters():
            p.requires_grad_(on)


class Freeze:
    name = "freeze"
    description = "Train only the top N blocks (optionally unfreezing one more every K steps); the result is a plain model"
    mergeable = True  # the saved blocks load onto the base: a plain model
    Options = FreezeOptions

    def apply(self, model: Any, options: FreezeOptions | None, context: Any) -> Any:
        options = options or FreezeOptions()
        for p in model.parameters():
            p.requires_grad_(False)
        blocks, start, final = _plan(model, options)
        _set_blocks(blocks, final)  # all eventually-trained blocks join the optimiser
        inner = getattr(model, "model", model)
        if options.train_norm and hasattr(inner, "norm"):
            for p in inner.norm.parameters():
                p.requires_grad_(True)
        if options.train_lm_head and model.get_output_embeddings() is not None:
            for p in model.get_output_embeddings().parameters():
                p.requires_grad_(True)
        model.tunesmith_freeze = {"options": options.model_dump(), "trained": sorted(n for n, p in model.named_parameters() if p.requires_grad)}
        if final > start and context is not None:
            context.state["freeze_plan"] = (start, final)
        return model

    def callbacks(self, options: FreezeOptions | None, context: Any) -> list[Any]:
        options = options or FreezeOptions()
        if not options.unfreeze_every or context is None or context.model is None:
            return []
        from transformers import TrainerCallback

        model = context.model
        blocks, start, final = _plan(model, options)
        every = options.unfreeze_every

        class GradualUnfreeze(TrainerCallback):
            def _apply(self, step: int) -> None:
                k = min(final, start + step // every)
                _set_blocks(blocks, k)
                context.state["unfrozen_blocks"] = k

            def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                self._apply(state.global_step)  # after the optimiser is built (resume-safe)

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                self._apply(state.global_step)

        return [GradualUnfreeze()]

    def state_dict(self, model: Any) -> dict:
        info = getattr(model, "tunesmith_freeze", None)
        names = set(info["trained"]) if info else {n for n, p in model.named_parameters() if p.requires_grad}
        return {k: v for k, v in model.state_dict().items() if k in names}

    def save(self, model: Any, path: str | Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict(model).items()}, str(path / WEIGHTS))
        info = getattr(model, "tunesmith_freeze", {})
        (path / CONFIG).write_text(json.dumps(info.get("options", {}), indent=2), encoding="utf-8")

    def load(self, model: Any, path: str | Path, options: Any = None) -> Any:
        from safetensors.torch import load_file

        missing, unexpected = model.load_state_dict(load_file(str(Path(path) / WEIGHTS)), strict=False)
        if unexpected:
            from tunesmith.core.errors import TunesmithError

            raise TunesmithError(f"{Path(path) / WEIGHTS} does not fit this model: unexpected {unexpected[:3]}")
        model.tie_weights()
        return model

    def merge(self, model: Any) -> Any:
        return model


@hookimpl
def register_peft_methods(register):  # type: ignore[no-untyped-def]
    register(Freeze())
