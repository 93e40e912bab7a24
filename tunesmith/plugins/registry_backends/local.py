"""``local`` registry back-end: ``versions.json`` in the registry folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tunesmith import hookimpl


class LocalRegistryBackend:
    name = "local"
    description = "versions.json in the registry folder (file lock, atomic replace; the default)"

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        lock_timeout: float = Field(60.0, gt=0, description="Seconds to wait for the registry's file lock.")

    def open(self, location: Path, options: Any) -> Any:
        from tunesmith.model_registry.local import ModelRegistry

        options = options or self.Options()
        return ModelRegistry(location, lock_timeout=options.lock_timeout)


@hookimpl
def register_registry_backends(register: Any) -> None:
    register(LocalRegistryBackend())
