"""Prefix tuning: trained key/value prefixes in every layer (peft); not mergeable."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tunesmith import hookimpl
from tunesmith.plugins.peft._common import PeftLibraryMethod


class PrefixOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_virtual_tokens: int = Field(20, ge=1, description="Length of the trained prefix.")
    projection: bool = Field(True, description="Reparameterise the prefix through a two-layer MLP (more stable).")
    projection_hidden: int = Field(512, ge=1, description="Hidden size of the reparameterisation MLP.")


class PrefixTuning(PeftLibraryMethod):
    name = "prefix_tuning"
    description = "Prefix tuning: trained virtual key/value tokens per layer (optional MLP projection); not mergeable"
    mergeable = False
    Options = PrefixOptions

    def peft_config(self, model: Any, options: PrefixOptions, context: Any) -> Any:
        from peft import PrefixTuningConfig

        return PrefixTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=options.num_virtual_tokens,
            prefix_projection=options.projection,
            encoder_hidden_size=options.projection_hidden,
        )


@hookimpl
def register_peft_methods(register):  # type: ignore[no-untyped-def]
    register(PrefixTuning())
