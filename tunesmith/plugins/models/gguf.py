"""Any GGUF file: dequantised once into a cached safetensors folder."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from tunesmith import hookimpl


class GGUFFile:
    name = "gguf"
    description = "A GGUF file (llama.cpp format), dequantised once and cached as safetensors"

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        path: str = Field(description="The .gguf file; relative paths are read from the config file's folder.")
        convert_dtype: str = Field("float32", description="dtype of the cached dequantised weights (float32 or bfloat16).")

    def resolve(self, options: "GGUFFile.Options") -> Path:
        from tunesmith.core.errors import ConfigError
        from tunesmith.core.models import convert_gguf

        p = Path(options.path).expanduser()
        if not p.is_file():
            raise ConfigError(f"GGUF file not found: {p}", key="model.path")
        return convert_gguf(p, dtype=options.convert_dtype)


@hookimpl
def register_model_sources(register):  # type: ignore[no-untyped-def]
    register(GGUFFile())
