"""Shared pieces of the PEFT-method plugins that wrap the ``peft`` library."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunesmith.core.templates import adapter_save_kwargs


def target_modules(value: Any) -> Any:
    """``all-linear`` passes through (peft resolves it); a comma string becomes a list."""
    if isinstance(value, str) and value != "all-linear":
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


class PeftLibraryMethod:
    """A method that builds a ``peft`` config and wraps the model in a PeftModel.

    Subclasses set ``name``, ``description``, ``mergeable``, ``Options`` and implement
    :meth:`peft_config`. The adapter is saved in the standard PEFT layout
    (``adapter_config.json`` + ``adapter_model.safetensors``), so plain
    ``peft.PeftModel.from_pretrained`` loads it.
    """

    name = "peft"
    description = ""
    mergeable = False
    saves_full_model = False

    def peft_config(self, model: Any, options: Any, context: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def prepare(self, model: Any, options: Any, context: Any) -> Any:
        """Hook for subclasses (QLoRA prepares a k-bit model here)."""
        return model

    def apply(self, model: Any, options: Any, context: Any) -> Any:
        from peft import get_peft_model

        model = self.prepare(model, options, context)
        return get_peft_model(model, self.peft_config(model, options, context))

    def save(self, model: Any, path: str | Path) -> None:
        model.save_pretrained(str(path), safe_serialization=True, **adapter_save_kwargs(model))

    def load(self, model: Any, path: str | Path, options: Any = None, *, is_trainable: bool = False) -> Any:
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(path), is_trainable=is_trainable)

    def merge(self, model: Any) -> Any:
        if not self.mergeable:
            from tunesmith.core.errors import TunesmithError

            raise TunesmithError(f"the PEFT method '{self.name}' cannot be merged into the base weights")
        return model.merge_and_unload()

    def state_dict(self, model: Any) -> dict:
        """The trained (adapter) tensors, as saved."""
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(model, **adapter_save_kwargs(model))
