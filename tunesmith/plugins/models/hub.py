"""A Hugging Face Hub id: downloaded when online, read from the local HF cache when offline."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from tunesmith import hookimpl


class HubModel:
    name = "hub"
    description = "A Hugging Face Hub model id (safetensors only; works offline from the cache)"

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        id: str = Field(description="The repository id, e.g. HuggingFaceTB/SmolLM2-135M-Instruct.")
        revision: str | None = Field(None, description="A branch, tag or commit.")

    def resolve(self, options: "HubModel.Options") -> Path:
        from tunesmith.core.errors import TunesmithError

        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
        try:
            from huggingface_hub import snapshot_download

            try:  # the local Hugging Face cache first
                path = snapshot_download(options.id, revision=options.revision, allow_patterns=patterns,
                                         local_files_only=True)
            except Exception:  # noqa: BLE001 - not cached
                local = _bundled_copy(options)
                if local is not None:  # a model source that carries this repository (the default model)
                    return local
                path = snapshot_download(options.id, revision=options.revision, allow_patterns=patterns,
                                         local_files_only=offline)
        except Exception as exc:  # noqa: BLE001 - hub errors are many; say what to do
            if offline:
                raise TunesmithError(
                    f"model '{options.id}' is not in the local Hugging Face cache and the hub is offline (HF_HUB_OFFLINE=1)",
                    hint="download it once with HF_HUB_OFFLINE=0, or use model.source: hf with a local folder",
                ) from None
            raise TunesmithError(f"could not download '{options.id}' from the hub: {type(exc).__name__}: {exc}") from None
        p = Path(path)
        if not any(p.glob("*.safetensors")):
            raise TunesmithError(f"'{options.id}' has no safetensors weights; tunesmith never loads pickled weights")
        return p


def _bundled_copy(options: "HubModel.Options") -> Path | None:
    """The folder of another model source whose ``hub_id`` is this id (no revision asked)."""
    if options.revision:
        return None
    from tunesmith.core.plugins import get_registries

    for name, source in get_registries().model_sources.items():
        if name != "hub" and getattr(source, "hub_id", None) == options.id:
            opts = source.Options() if getattr(source, "Options", None) is not None else None
            return Path(source.resolve(opts))
    return None


@hookimpl
def register_model_sources(register):  # type: ignore[no-untyped-def]
    register(HubModel())
