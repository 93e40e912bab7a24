"""tunesmith: a plugin-based engine for fine-tuning language models.

The public Python API mirrors the CLI. Importing this package is cheap: it pulls in
pluggy only, and everything else is imported when first used.

    import tunesmith
    regs = tunesmith.registry()            # every plugin area, by name
    regs.peft_methods.get("lora")          # a registered PEFT method
    cfg = tunesmith.load_config("run.yaml", overrides=["training.max_steps=10"])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tunesmith._markers import hookimpl, hookspec

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "hookimpl",
    "hookspec",
    "registry",
    "load_config",
    "validate_config",
    "reset_plugins",
]

if TYPE_CHECKING:  # pragma: no cover
    from tunesmith.core.config import Config
    from tunesmith.core.registry import Registries


def registry(*, disable: tuple[str, ...] | list[str] = (), strict: bool = False) -> "Registries":
    """Every plugin area's registry, built from the installed entry points (cached)."""
    from tunesmith.core.plugins import get_registries

    return get_registries(disable=tuple(disable), strict=strict)


def load_config(path: Any, overrides: list[str] | tuple[str, ...] = (), *, registries: Any = None) -> "Config":
    """Read, override (``key.path=value``) and validate a YAML config, plugins' sections included."""
    from tunesmith.core.config import load_config as _load

    return _load(path, overrides=overrides, registries=registries)


def validate_config(data: dict, *, registries: Any = None, source: str = "<config>") -> "Config":
    """Validate an already-parsed config mapping."""
    from tunesmith.core.config import validate_config as _validate

    return _validate(data, registries=registries, source=source)


def reset_plugins() -> None:
    """Forget the cached plugin manager and registries (tests, notebooks after pip install)."""
    from tunesmith.core.plugins import reset

    reset()
