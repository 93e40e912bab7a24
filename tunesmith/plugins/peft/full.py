"""Full fine-tuning: every weight trains; the result is a complete model folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tunesmith import hookimpl


class FullOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    train_embeddings: bool = Field(True, description="Train the (tied) embedding matrix too.")


class Full:
    name = "full"
    description = "Full fine-tuning of every weight; saves a complete safetensors model"
    mergeable = True  # nothing to merge: the result already is a standalone model
    default_learning_rate = 1e-5
    saves_full_model = True
    Options = FullOptions

    def apply(self, model: Any, options: FullOptions | None, context: Any) -> Any:
        for p in model.parameters():
            p.requires_grad_(True)
        if options is not None and not options.train_embeddings:
            emb = model.get_input_embeddings()
            if emb is not None:
                emb.weight.requires_grad_(False)
        return model

    def save(self, model: Any, path: str | Path) -> None:
        model.save_pretrained(str(path), safe_serialization=True)

    def load(self, model: Any, path: str | Path, options: Any = None) -> Any:
        import torch
        from transformers import AutoModelForCausalLM

        dtype = next(model.parameters()).dtype if model is not None else torch.float32
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=False)

    def merge(self, model: Any) -> Any:
        return model

    def state_dict(self, model: Any) -> dict:
        return {k: v for k, v in model.state_dict().items()}


@hookimpl
def register_peft_methods(register):  # type: ignore[no-untyped-def]
    register(Full())
