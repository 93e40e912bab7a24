"""Bottleneck adapters (Houlsby/Pfeiffer style) after each block's feed-forward.

``h + up(act(down(h)))`` with the down-projection initialised with a small normal
(std 0.01) and the up-projection at zero, so training starts from the base model
exactly. Only the adapters train; they are saved as ``bottleneck_adapter.safetensors``
with ``bottleneck_config.json``. They add modules, so they cannot be merged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tunesmith import hookimpl

WEIGHTS = "bottleneck_adapter.safetensors"
CONFIG = "bottleneck_config.json"
ATTR = "tunesmith_bottleneck"


class BottleneckOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: int = Field(64, ge=1, description="Bottleneck width (down-projection size).")
    activation: Literal["gelu", "relu", "silu"] = Field("gelu", description="Non-linearity between the projections.")
    init_std: float = Field(0.01, ge=0.0, description="Std of the down-projection init (the up-projection starts at zero).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout inside the adapter.")


def _adapter_class() -> type:
    import torch.nn as nn

    class BottleneckAdapter(nn.Module):
        def __init__(self, hidden: int, size: int, activation: str, init_std: float, dropout: float) -> None:
            super().__init__()
            self.down = nn.Linear(hidden, size)
            self.up = nn.Linear(size, hidden)
            self.act = {"gelu": nn.GELU(), "relu": nn.ReLU(), "silu": nn.SiLU()}[activation]
            self.drop = nn.Dropout(dropout)
            nn.init.normal_(self.down.weight, std=init_std)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

        def forward(self, h: Any) -> Any:
            return h + self.up(self.drop(self.act(self.down(h))))

    return BottleneckAdapter


class Bottleneck:
    name = "bottleneck"
    description = "Bottleneck adapters after each feed-forward (down, activation, up, residual; zero-init up); not mergeable"
    mergeable = False
    Options = BottleneckOptions

    def apply(self, model: Any, options: BottleneckOptions | None, context: Any) -> Any:
        from tunesmith.plugins.peft._layers import block_list, hidden_size, mlp_of

        options = options or BottleneckOptions()
        for p in model.parameters():
            p.requires_grad_(False)
        _, blocks = block_list(model)
        cls = _adapter_class()
        hid = hidden_size(model)
        ref = next(model.parameters())
        for block in blocks:
            adapter = cls(hid, options.size, options.activation, options.init_std, options.dropout).to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
            setattr(block, ATTR, adapter)  # registered as a submodule of the block

            def hook(module: Any, inputs: Any, output: Any, adapter: Any = adapter) -> Any:
                if isinstance(output, tuple):
                    return (adapter(output[0]),) + tuple(output[1:])
                return adapter(output)

            mlp_of(block).register_forward_hook(hook)
        model.tunesmith_bottleneck_options = options.model_dump()
        return model

    def state_dict(self, model: Any) -> dict:
        return {k: v for k, v in model.state_dict().items() if f".{ATTR}." in k}

    def save(self, model: Any, path: str | Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict(model).items()}
        save_file(tensors, str(path / WEIGHTS))
        opts = getattr(model, "tunesmith_bottleneck_options", BottleneckOptions().model_dump())
        (path / CONFIG).write_text(json.dumps(opts, indent=2), encoding="utf-8")

    def load(self, model: Any, path: str | Path, options: BottleneckOptions | None = None) -> Any:
        from safetensors.torch import load_file

        path = Path(path)
        if options is None and (path / CONFIG).exists():
            options = BottleneckOptions.model_validate(json.loads((path / CONFIG).read_text(encoding="utf-8")))
        model = self.apply(model, options, None)
        missing, unexpected = model.load_state_dict(load_file(str(path / WEIGHTS)), strict=False)
        if unexpected:
            from tunesmith.core.errors import TunesmithError

            raise TunesmithError(f"{path / WEIGHTS} does not fit this model: unexpected {unexpected[:3]}")
        return model


@hookimpl
def register_peft_methods(register):  # type: ignore[no-untyped-def]
    register(Bottleneck())
