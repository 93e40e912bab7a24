"""IA3: learned rescaling vectors on keys, values and the feed-forward (peft); mergeable."""

from __future__ import annotations

from typing import Any, Union

from pydantic import BaseModel, ConfigDict, Field

from tunesmith import hookimpl
from tunesmith.plugins.peft._common import PeftLibraryMethod, target_modules


class IA3Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    target_modules: Union[list[str], str, None] = Field(
        None, description="Modules to rescale; default: peft's choice for the architecture (k, v, down projections)."
    )
    feedforward_modules: Union[list[str], str, None] = Field(
        None, description="Which of target_modules are feed-forward (rescaled at their input)."
    )


class IA3(PeftLibraryMethod):
    name = "ia3"
    description = "IA3 learned rescaling vectors on attention and feed-forward activations; mergeable"
    mergeable = True
    Options = IA3Options

    def peft_config(self, model: Any, options: IA3Options, context: Any) -> Any:
        from peft import IA3Config

        return IA3Config(
            task_type="CAUSAL_LM",
            target_modules=target_modules(options.target_modules),
            feedforward_modules=target_modules(options.feedforward_modules),
        )


@hookimpl
def register_peft_methods(register):  # type: ignore[no-untyped-def]
    register(IA3())
