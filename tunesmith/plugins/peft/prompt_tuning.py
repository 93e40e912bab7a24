"""Prompt tuning: trained soft-prompt embeddings, optionally initialised from text (peft)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tunesmith import hookimpl
from tunesmith.plugins.peft._common import PeftLibraryMethod


class PromptOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_virtual_tokens: int = Field(8, ge=1, description="Length of the soft prompt.")
    init_text: str | None = Field(None, description="Initialise the soft prompt from this text's token embeddings.")


class PromptTuning(PeftLibraryMethod):
    name = "prompt_tuning"
    description = "Prompt tuning: trained virtual input tokens (soft-prompt embeddings), optionally initialised from text; not mergeable"
    mergeable = False
    Options = PromptOptions

    def peft_config(self, model: Any, options: PromptOptions, context: Any) -> Any:
        from peft import PromptTuningConfig, PromptTuningInit

        kwargs: dict[str, Any] = {"task_type": "CAUSAL_LM", "num_virtual_tokens": options.num_virtual_tokens}
        if options.init_text:
            tok = getattr(context, "tokenizer", None)
            name = getattr(tok, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
            kwargs.update(
                prompt_tuning_init=PromptTuningInit.TEXT,
                prompt_tuning_init_text=options.init_text,
                tokenizer_name_or_path=name,
            )
        return PromptTuningConfig(**kwargs)


@hookimpl
def register_peft_methods(register):  # type: ignore[no-untyped-def]
    register(PromptTuning())
