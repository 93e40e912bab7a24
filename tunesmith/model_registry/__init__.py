"""The model registry: versions of trained models, stages, canary share, rollback.

Not part of core. Where versions live is a registry back-end plugin
(``register_registry_backends``; built in: ``local``, a versions.json file, and
``mlflow``, the MLflow Model Registry); the rules are
:mod:`tunesmith.model_registry.state`'s, the same for every back-end.
``tunesmith registry`` is its command and the pipeline's ``register`` stage
reaches it through :func:`open_registry`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def open_registry(location: str | Path, backend: str = "local", options: Any = None, *, registries: Any = None) -> Any:
    """The registry store at ``location`` through the back-end plugin ``backend``.

    ``options`` is the back-end's validated ``Options``, a plain mapping (validated
    here) or None (the defaults).
    """
    if registries is None:
        from tunesmith.core.plugins import get_registries

        registries = get_registries()
    plugin = registries.registry_backends.get(backend)
    model = getattr(plugin, "Options", None)
    if model is not None and not isinstance(options, model):
        from pydantic import ValidationError

        from tunesmith.core.errors import ConfigError

        try:
            options = model.model_validate(dict(options or {}))
        except ValidationError as exc:
            first = exc.errors()[0]
            key = ".".join(str(p) for p in first["loc"])
            raise ConfigError(f"registry back-end '{backend}': {key}: {first['msg']}", key=f"registry.{key}") from None
    return plugin.open(Path(location).expanduser(), options)


def open_config_registry(cfg: Any, registries: Any = None) -> Any:
    """The registry a config names (``registry.path`` [+ ``registry.name``], ``registry.backend``)."""
    root = Path(cfg.resolve_path(cfg.registry.path))
    location = root / cfg.registry.name if cfg.registry.name else root
    backend = getattr(cfg.registry, "backend", "local")
    options = cfg.registry._options if getattr(cfg.registry, "_options", None) is not None else cfg.registry.plugin_fields() \
        if hasattr(cfg.registry, "plugin_fields") else None
    return open_registry(location, backend, options, registries=registries)
