"""Dropout for adapter inputs that is cheaper on CPU.

On CPU ``torch.nn.functional.dropout`` draws one Mersenne-Twister number per
element (``bernoulli_``); with LoRA on every linear layer of a small model that
is about a fifth of a training step. :class:`FastDropout` draws 64-bit random
words and uses each as four independent 16-bit uniforms, so it needs a quarter
of the draws: an element is kept when its 16-bit value is at least
``round(p * 65536)``, i.e. with probability ``1 - p`` up to a quantisation of
``p`` to 1/65536 (below 1e-5 absolute), and kept elements are scaled by
``1 / (1 - p_q)`` with ``p_q`` the quantised rate, so the expectation is exact.
Masks come from torch's default CPU generator, so seeding and the Trainer's
RNG checkpointing (crash + resume) behave as with ``nn.Dropout``.

On other devices, in eval mode and for ``p == 0`` it is ``nn.Dropout``. It is a
subclass of ``nn.Dropout``, so code that checks for one (peft's DoRA path) sees
no difference, and it has no state: saved adapters are unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

_LEVELS = 1 << 16


def _uniforms16(shape: torch.Size) -> torch.Tensor:
    """int16 tensor of ``shape``: four 16-bit uniforms from each 64-bit random word."""
    n = 1
    for s in shape:
        n *= int(s)
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64)
    return words.view(torch.int16)[:n].view(shape)


def _keep_mask(shape: torch.Size, threshold: int) -> torch.Tensor:
    """Bool mask of ``shape``: True where a 16-bit uniform (as int16) is >= threshold."""
    return _uniforms16(shape) >= threshold


def drop_mask(shape: torch.Size, threshold: int) -> torch.Tensor:
    """The complement of :func:`_keep_mask` from the same draws: True where dropped."""
    return _uniforms16(shape) < threshold


class _MaskedScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.where(keep, x, 0).mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, None, None]:  # type: ignore[override]
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad, 0).mul_(ctx.scale), None, None


class FastDropout(nn.Dropout):
    """``nn.Dropout`` with 16-bit masks on CPU (see the module docstring)."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__(p=p, inplace=False)
        dropped = int(round(self.p * _LEVELS))
        self._threshold = dropped - _LEVELS // 2  # int16 values are offset by 2**15
        self._scale = 1.0 / (1.0 - dropped / _LEVELS) if dropped < _LEVELS else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu" or not x.is_floating_point():
            return super().forward(x)
        return _MaskedScale.apply(x, _keep_mask(x.shape, self._threshold), self._scale)

    def extra_repr(self) -> str:
        return f"p={self.p}, 16-bit CPU masks"


def use_fast_dropout(model: nn.Module) -> int:
    """Replace the ``nn.Dropout`` modules of peft's LoRA layers (``lora_dropout``) by
    :class:`FastDropout` with the same rate; returns how many were replaced."""
    replaced = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if not isinstance(drops, nn.ModuleDict):
            continue
        for name, drop in list(drops.items()):
            if type(drop) is nn.Dropout and drop.p > 0.0:
                fast = FastDropout(drop.p)
                fast.train(drop.training)
                drops[name] = fast
                replaced += 1
    return replaced


#: up to this rate the fused LoRA layer draws the dropped positions (geometric gaps)
#: instead of a mask of 16-bit uniforms: about ``p x n`` float draws instead of ``n / 4``
#: 64-bit words, and the gradient zeroes ``p x n`` elements instead of a full masked pass
GEOMETRIC_MAX_P = 0.25


def drop_positions(n: int, p: float) -> torch.Tensor:
    """Sorted flat indices in ``[0, n)`` dropped by i.i.d. Bernoulli(``p``) dropout.

    The gaps between successive dropped elements of a Bernoulli process are
    geometric: ``gap = floor(log(1 - U) / log(1 - p)) + 1`` for uniform ``U``, so the
    positions are the running sum of the gaps, and only about ``p x n`` uniforms are
    drawn (from torch's default CPU generator: seeding and RNG checkpoints apply).
    Exact in distribution up to the float32 resolution of ``U`` (unlike
    :class:`FastDropout`, ``p`` is not quantised).
    """
    import math

    if n <= 0 or p <= 0.0:
        return torch.empty(0, dtype=torch.int64)
    log_keep = math.log1p(-p)
    mean = n * p
    m = int(mean + 6.0 * math.sqrt(mean * (1.0 - p)) + 16)
    chunks: list[torch.Tensor] = []
    end = -1
    while end < n - 1:  # almost always once: m covers n but for a 6-sigma shortfall
        gaps = torch.rand(m).neg_().log1p_().div_(log_keep).floor_().to(torch.int64).add_(1)
        pos = torch.cumsum(gaps, 0).add_(end)
        chunks.append(pos)
        end = int(pos[-1])
    pos = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
    return pos[: int(torch.searchsorted(pos, n))]


def drop_positions_traceable(n: Any, p: float, rate16: int | None = None) -> torch.Tensor:
    """:func:`drop_positions` for torch.compile: a fixed number of draws, no data-dependent size.

    ``m = 1.25 n p + 64`` gaps are drawn (at least 8 standard deviations above the
    expected count of dropped elements) and their running sum is clamped to ``n``:
    every entry ``< n`` is a dropped position (the same geometric gaps, so the same
    i.i.d. Bernoulli(``p``) law), and the entries past the end all read ``n``, which
    the caller ignores (the fused layer's ``_zero_at``). Only the count is not data-dependent,
    so inductor compiles it (with its own generator, seeded from torch's global one:
    seeded runs repeat). If the gaps fell short of ``n`` (beyond 8 sigma: below 1e-15)
    the tail would keep its values.
    """
    import math

    # 1.25 p in units of 2**-20; ``rate16`` (p in units of 2**-16, an int attribute of
    # FastDropout) keeps the count free of a symbolic float under torch.compile
    per = rate16 * 20 if rate16 is not None else int(1.25 * p * 2**20)
    m = (n * per) // 2**20 + 64
    gaps = torch.rand(m).neg_().log1p_().div_(math.log1p(-p)).to(torch.int64).add_(1)
    return torch.cumsum(gaps, 0).sub_(1).clamp_(max=n)
