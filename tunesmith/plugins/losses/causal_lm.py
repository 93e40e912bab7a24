"""The causal-LM loss: token-weighted cross-entropy over the labelled tokens.

Completion-only masking is done when rendering (labels are -100 outside the
assistant turns, see :mod:`tunesmith.core.render`). The loss is the *sum* of the
token losses divided by ``batch.num_items_in_batch`` - the labelled tokens of the
whole accumulated batch (all micro-batches, all devices) - so gradient accumulation
gives the same loss and gradients as the equivalent full batch, not an average of
per-micro-batch means.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tunesmith import hookimpl


class CausalLMOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="Label smoothing of the cross-entropy.")


class CausalLM:
    name = "causal_lm"
    description = "Token-weighted next-token cross-entropy on the labelled (completion) tokens"
    requires = "tokens"
    #: the value is normalised by batch.num_items_in_batch (the accumulated batch)
    scaled_for_accumulation = True
    Options = CausalLMOptions

    def compute(self, model: Any, batch: Any, options: CausalLMOptions | None, context: Any) -> tuple[Any, dict]:
        import torch.nn.functional as F

        smoothing = options.label_smoothing if options is not None else 0.0
        if smoothing == 0.0 and hasattr(batch, "forward"):
            out = batch.forward(model)  # the model's own token-weighted loss (shared forward pass)
            loss = out.loss
        else:
            out = batch.forward(model) if hasattr(batch, "forward") else model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
            logits = out.logits[:, :-1, :].float()
            labels = batch["labels"][:, 1:].to(logits.device)
            total = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                reduction="sum", label_smoothing=smoothing,
            )
            n = getattr(batch, "num_items_in_batch", None)
            if n is None:
                n = labels.ne(-100).sum()
            loss = total / n
        return loss, {}


@hookimpl
def register_losses(register):  # type: ignore[no-untyped-def]
    register(CausalLM())
