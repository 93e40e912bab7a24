"""What ``tunesmith serve`` hands a serving engine (see the ServingEngine protocol)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ServeSpec:
    """The base model and adapters to serve, and where.

    ``base`` and the adapter paths are as the user gave them (a folder, a run
    directory, a .gguf file or a model-source name): each engine resolves what it
    needs (a safetensors folder for transformers and vLLM, GGUF files for llama.cpp).
    """

    base: str = "default"
    adapters: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    registry: str | None = None
    log_level: str = "info"
    registries: Any = None

    def public(self) -> dict:
        """The spec without secrets or live objects (for --dry-run output and logs)."""
        return {"base": self.base, "adapters": dict(self.adapters), "host": self.host, "port": self.port,
                "api_key": "***" if self.api_key else None, "registry": self.registry}
