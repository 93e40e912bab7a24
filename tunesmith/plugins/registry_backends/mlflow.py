"""``mlflow`` registry back-end: the MLflow Model Registry (a sqlite file or an ``mlflow server``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tunesmith import hookimpl


class MlflowRegistryBackend:
    name = "mlflow"
    description = "MLflow Model Registry: one registered model, stages as aliases (sqlite file or mlflow server)"

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        tracking_uri: str | None = Field(
            None,
            description="MLflow store: sqlite:///path.db or http://127.0.0.1:5000. Default: $MLFLOW_TRACKING_URI, "
                        "else sqlite:///<registry folder>/mlflow.db.",
        )
        registry_uri: str | None = Field(None, description="Model-registry store if not the tracking store ($MLFLOW_REGISTRY_URI).")
        model_name: str | None = Field(None, description="The registered model's name. Default: the registry folder's name (registry.name).")
        lock_timeout: float = Field(60.0, gt=0, description="Seconds to wait for the registry lock (a file lock beside a sqlite store; a lock model on an mlflow server).")
        upload_artifacts: bool | None = Field(
            None, description="Copy the artefacts into MLflow's artefact store and use runs:/ sources. "
                              "Default: yes for a server (it refuses local paths), no for a sqlite file.")

    def open(self, location: Path, options: Any) -> Any:
        import os

        from tunesmith.model_registry.mlflow_store import MlflowRegistry, default_tracking_uri

        options = options or self.Options()
        location = Path(location)
        uri = options.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(location)
        registry_uri = options.registry_uri or os.environ.get("MLFLOW_REGISTRY_URI") or uri
        name = options.model_name or location.resolve().name
        return MlflowRegistry(uri, name, registry_uri=registry_uri, lock_timeout=options.lock_timeout,
                             upload_artifacts=options.upload_artifacts)


@hookimpl
def register_registry_backends(register: Any) -> None:
    register(MlflowRegistryBackend())
