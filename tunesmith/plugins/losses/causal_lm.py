"""The causal-LM loss: token-weighted cross-entropy over the labelled tokens.

The output head runs only at the labelled positions (``LossBatch.token_loss``):
with completion-only labels the prompt's vocabulary-sized logits are never
computed. Completion-only masking is done when rendering (labels are -100 outside the
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
        smoothing = options.label_smoothing if options is not None else 0.0
        if hasattr(batch, "token_loss"):
            # the output head runs only at the labelled positions (LossBatch.token_loss)
            return batch.token_loss(model, label_smoothing=smoothing), {}
        import torch.nn.functional as F

        from tunesmith.core.labelled import IGNORE_INDEX, shifted_labels

        out = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
        labels = batch["labels"]
        targets = shifted_labels(labels)
        keep = targets.ne(IGNORE_INDEX)
        logits = out.logits[:, -labels.shape[1]:][keep.to(out.logits.device)].float()
        total = F.cross_entropy(logits, targets[keep].to(logits.device), reduction="sum", label_smoothing=smoothing)
        n = getattr(batch, "num_items_in_batch", None)
        return total / (n if n is not None else keep.sum()), {}


@hookimpl
def register_losses(register):  # type: ignore[no-untyped-def]
    register(CausalLM())
