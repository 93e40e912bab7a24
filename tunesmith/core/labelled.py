"""The causal-LM output head at the labelled positions only.

Training and scoring need the logits only where the next token is labelled (not
-100); with completion-only labels most positions of a chat example are prompt.
:func:`labelled_forward` runs the model with a forward pre-hook on its output
head that keeps just those hidden states, so the ``hidden x vocabulary``
projection, the logits and the softmax cover the labelled tokens only. Used by
the ``causal_lm`` loss (``LossBatch.token_loss``) and the perplexity scoring.
"""

from __future__ import annotations

from typing import Any

IGNORE_INDEX = -100


def shifted_labels(labels: Any) -> Any:
    """``labels`` moved one position left (position t predicts token t+1), -100 at the end."""
    import torch

    out = torch.full_like(labels, IGNORE_INDEX)
    out[..., :-1] = labels[..., 1:]
    return out


def output_head(model: Any) -> Any:
    """The output-embedding module of a (DDP-, PEFT-wrapped) causal LM, or None where
    the labelled-positions path cannot be used (prompt-learning PEFT methods)."""
    inner = model
    wrapped = {"DistributedDataParallel": "module", "DataParallel": "module", "OptimizedModule": "_orig_mod"}
    while type(inner).__name__ in wrapped and getattr(inner, wrapped[type(inner).__name__], None) is not None:
        inner = getattr(inner, wrapped[type(inner).__name__])
    peft_config = getattr(inner, "peft_config", None)
    if isinstance(peft_config, dict) and hasattr(inner, "get_base_model"):
        active = getattr(inner, "active_adapter", None)
        cfg = peft_config.get(active) if isinstance(active, str) else None
        if cfg is None or getattr(cfg, "is_prompt_learning", False):
            return None
        inner = inner.get_base_model()
    get = getattr(inner, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if hasattr(head, "register_forward_pre_hook") else None


def labelled_forward(model: Any, inputs: dict, labels: Any) -> tuple[Any, Any] | None:
    """Run ``model`` with its output head applied only where ``labels`` (after the
    causal shift) are not -100; returns ``(logits [n, vocab], targets [n])``, or
    None when the model does not allow it (the caller then runs the full forward).

    A forward pre-hook on the output head replaces the hidden states ``[B, L, H]``
    by the labelled rows ``[n, H]``; everything after the head in the model's
    forward (soft-capping, scaling, the dtype cast) is element-wise and applies
    unchanged. No labels go to the model, so it computes no loss of its own.
    """
    head = output_head(model)
    if head is None:
        return None
    targets = shifted_labels(labels)
    keep = targets.ne(IGNORE_INDEX)
    seen: dict[str, bool] = {}

    def select(_module: Any, args: tuple) -> Any:
        hidden = args[0]
        if hidden.dim() == 3 and tuple(hidden.shape[:2]) == tuple(keep.shape):
            seen["gathered"] = True
            return (hidden[keep.to(hidden.device)],) + tuple(args[1:])
        seen["other"] = True
        return None

    handle = head.register_forward_pre_hook(select)
    try:
        out = model(**inputs, use_cache=False)
    finally:
        handle.remove()
    logits = out.logits
    if not seen.get("gathered") or seen.get("other") or logits.dim() != 2 or logits.shape[0] != int(keep.sum()):
        # the head ran on something else (or more than once): use the plain logits
        if logits.dim() == 3 and logits.shape[1] >= labels.shape[1]:
            logits = logits[:, -labels.shape[1]:]
            return logits[keep.to(logits.device)], targets[keep]
        return None
    return logits, targets[keep]
