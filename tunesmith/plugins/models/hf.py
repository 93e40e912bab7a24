"""A local Hugging Face model folder (config.json + safetensors + tokenizer files)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from tunesmith import hookimpl


class HFFolder:
    name = "hf"
    description = "A local Hugging Face model folder (config.json, safetensors, tokenizer)"

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        path: str = Field(description="The model folder; relative paths are read from the config file's folder.")

    def resolve(self, options: "HFFolder.Options") -> Path:
        from tunesmith.core.errors import ConfigError

        p = Path(options.path).expanduser()
        if not p.is_dir():
            raise ConfigError(f"model folder not found: {p}", key="model.path")
        if not (p / "config.json").exists():
            raise ConfigError(f"{p} has no config.json: not a Hugging Face model folder", key="model.path")
        if not any(p.glob("*.safetensors")):
            raise ConfigError(
                f"{p} has no .safetensors weights (tunesmith never loads pickled weights)", key="model.path",
                hint="convert the weights with `transformers` save_pretrained(safe_serialization=True)",
            )
        return p


@hookimpl
def register_model_sources(register):  # type: ignore[no-untyped-def]
    register(HFFolder())
