"""Finding the stack of transformer blocks in a causal LM (for freeze and bottleneck)."""

from __future__ import annotations

from typing import Any


def block_list(model: Any) -> tuple[str, Any]:
    """(qualified name, ModuleList) of the decoder blocks: the longest ModuleList of one class."""
    import torch.nn as nn

    best: tuple[str, Any] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(m) for m in mod}) == 1:
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        from tunesmith.core.errors import TunesmithError

        raise TunesmithError(f"cannot find the transformer blocks of {type(model).__name__}")
    return best


def mlp_of(block: Any) -> Any:
    for attr in ("mlp", "feed_forward", "ffn", "mlp_block"):
        if hasattr(block, attr):
            return getattr(block, attr)
    from tunesmith.core.errors import TunesmithError

    raise TunesmithError(f"cannot find the feed-forward module of {type(block).__name__}")


def hidden_size(model: Any) -> int:
    cfg = model.config
    for attr in ("hidden_size", "n_embd", "d_model"):
        if getattr(cfg, attr, None):
            return int(getattr(cfg, attr))
    return int(model.get_input_embeddings().weight.shape[1])
