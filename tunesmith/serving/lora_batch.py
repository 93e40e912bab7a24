"""Mixed-adapter LoRA batches with few operations per layer.

peft's mixed-adapter batches (``adapter_names=``) split every LoRA layer's input
into one sub-batch per adapter, each with its own index lists built in Python:
a dozen small operations per layer and adapter, which on a small model costs more
than the matrix products themselves. Here each LoRA ``Linear`` layer keeps its
adapters' A matrices stacked (``[sum of ranks, in]``) and B matrices side by side
(``[out, sum of ranks]``); a step computes, for every row at once,

    base(x) + ((x @ A_all.T) * mask) @ B_all.T

where ``mask`` (one per distinct set of adapters and ranks, built once per step)
holds, for each row, its adapter's ``scaling`` on that adapter's slice of the
ranks and zero elsewhere: a row of adapter *a* gets exactly ``scaling_a *
B_a(A_a(x))``, a base row nothing. Four operations per layer whatever the mix.

Only plain LoRA on ``nn.Linear`` layers takes this path (no DoRA or other
variants, no LoRA biases, no ``fan_in_fan_out``); otherwise :attr:`FusedLoRA.ok`
is False and the engine uses peft's ``adapter_names``.
"""

from __future__ import annotations

import threading
from typing import Any


class FusedLoRA:
    """The stacked LoRA weights of a PeftModel's layers and the rows of the step running."""

    def __init__(self) -> None:
        self.ok = False
        self.rows: list[str | None] | None = None  # the adapter of each row while a step runs
        self._masks: dict[tuple, Any] = {}
        self._lock = threading.Lock()

    def rebuild(self, model: Any) -> None:
        """Stack the weights again (after an adapter loaded or unloaded; inside the model gate)."""
        import torch
        from peft.tuners.lora import layer as lora_layer

        mods = list(model.modules())
        layers = [m for m in mods if isinstance(m, lora_layer.LoraLayer)]
        # modules_to_save / trainable-token wrappers follow the active adapter: peft's mixed batches only
        ok = bool(layers) and not any(type(m).__name__ in ("ModulesToSaveWrapper", "TrainableTokensWrapper") for m in mods)
        for m in layers:
            if type(m) is not lora_layer.Linear or getattr(m, "fan_in_fan_out", False) or getattr(m, "lora_variant", None) \
                    or any(getattr(m, "lora_bias", {}).values()):
                ok = False
                break
        self.ok = ok
        self._masks = {}
        if not ok:
            return
        with torch.no_grad():
            for m in layers:
                names = list(m.lora_A.keys())
                if not names:
                    m._tunesmith_fused = None
                else:
                    a = torch.cat([m.lora_A[n].weight for n in names], 0)
                    b = torch.cat([m.lora_B[n].weight for n in names], 1)
                    key = tuple((n, int(m.lora_A[n].weight.shape[0]), float(m.scaling[n])) for n in names)
                    m._tunesmith_fused = (a, b, key)
                if "forward" not in m.__dict__:
                    m.forward = _bind(m, self, m.forward)

    def start(self, rows: list[str | None]) -> None:
        self.rows = rows
        self._masks = {}

    def stop(self) -> None:
        self.rows = None
        self._masks = {}

    def mask(self, key: tuple, like: Any) -> Any:
        """``[rows, 1, sum of ranks]``: each row's scaling on its adapter's slice (None: no row uses these adapters)."""
        m = self._masks.get(key, False)
        if m is not False:
            return m
        import torch

        rows = self.rows or []
        offsets: dict[str, tuple[int, int, float]] = {}
        k = 0
        for name, r, scaling in key:
            offsets[name] = (k, k + r, scaling)
            k += r
        out = torch.zeros((len(rows), 1, k), dtype=like.dtype)
        used = False
        for i, a in enumerate(rows):
            if a in offsets:
                lo, hi, s = offsets[a]
                out[i, 0, lo:hi] = s
                used = True
        m = out.to(like.device) if used else None
        self._masks[key] = m
        return m


def _bind(module: Any, fused: FusedLoRA, original: Any) -> Any:
    import torch.nn.functional as F

    def forward(x: Any, *args: Any, **kwargs: Any) -> Any:
        state = module.__dict__.get("_tunesmith_fused")
        if fused.rows is None or state is None or module.merged or module.disable_adapters or "adapter_names" in kwargs:
            return original(x, *args, **kwargs)
        result = module.base_layer(x, *args, **kwargs)
        a, b, key = state
        mask = fused.mask(key, a)
        if mask is None:
            return result
        h = F.linear(x.to(a.dtype), a) * mask
        return result + F.linear(h, b).to(result.dtype)

    return forward
