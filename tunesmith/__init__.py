"""tunesmith: a plugin-based engine for fine-tuning language models.

The public Python API mirrors the CLI. Importing this package is cheap: it pulls in
pluggy only, and everything else is imported when first used.

    import tunesmith
    regs = tunesmith.registry()            # every plugin area, by name
    regs.peft_methods.get("lora")          # a registered PEFT method
    cfg = tunesmith.load_config("run.yaml", overrides=["training.max_steps=10"])
    result = tunesmith.train(cfg)          # any objective; RUN/final holds the adapter
    report = tunesmith.evaluate(cfg)       # the configured evaluators, tuned vs base
    path = tunesmith.export(result["run_dir"], "merged", "out/merged")
    summary = tunesmith.run(cfg)           # the whole pipeline: data -> ... -> register

These functions are the supported API; ``tunesmith.core`` is the machinery behind
them (plugins use its public pieces, documented in docs/architecture.md).
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
    "train",
    "evaluate",
    "export",
    "run",
    "prepare_data",
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


def train(cfg: Any, *, resume: bool = False, run_dir: Any = None, registries: Any = None) -> dict:
    """Train as the config says (any installed objective); returns the result dict
    (``run_dir``, ``output_path``, ``steps``, ``train_loss`` or the reward curve, ...)."""
    from tunesmith.core.session import train as _train

    return _train(_as_config(cfg), registries, resume=resume, run_dir=run_dir)


def evaluate(cfg: Any, *, run_dir: Any = None, compare_base: bool = True, registries: Any = None) -> dict:
    """Run the configured evaluators on a trained run (and on its base model, to compare);
    writes RUN/eval/report.md and report.json and returns the report."""
    from pathlib import Path

    from tunesmith.core.evaluation import evaluate_run
    from tunesmith.core.rundir import RunDir
    from tunesmith.core.session import resolve_registries

    cfg = _as_config(cfg)
    rd = RunDir(Path(run_dir)) if run_dir else RunDir.for_config(cfg)
    return evaluate_run(cfg, resolve_registries(cfg, registries), rd, compare_base=compare_base)


def export(run_dir: Any, format: str, output: Any = None, *, options: dict | None = None, registries: Any = None) -> Any:
    """Export a trained run with an exporter plugin (``adapter``, ``merged``, ``gguf``, ...);
    returns the written path."""
    from tunesmith.core.export import export_run

    return export_run(run_dir, format, output, options=options, registries=registries)


def run(cfg: Any, *, from_stage: str | None = None, until: str | None = None, resume: bool = False, registries: Any = None) -> dict:
    """The whole pipeline (data, train, evaluate, export, register); returns the summary."""
    from tunesmith.core.pipeline import run_pipeline

    from tunesmith.core.session import resolve_registries

    cfg = _as_config(cfg)
    return run_pipeline(cfg, resolve_registries(cfg, registries), from_stage=from_stage, until=until, resume=resume)


def prepare_data(cfg: Any, out_dir: Any = None, *, registries: Any = None) -> dict:
    """Load, clean, format and split the config's data into ``out_dir`` (default RUN/data)."""
    from pathlib import Path

    from tunesmith.core.data_ops import prepare_data as _prepare
    from tunesmith.core.rundir import RunDir
    from tunesmith.core.session import resolve_registries

    cfg = _as_config(cfg)
    out = Path(out_dir) if out_dir else RunDir.for_config(cfg).data_dir
    return _prepare(cfg, resolve_registries(cfg, registries), out)


def _as_config(cfg: Any) -> "Config":
    """A Config from a Config, a YAML path or a mapping."""
    from pathlib import Path

    from tunesmith.core.config import Config

    if isinstance(cfg, Config):
        return cfg
    if isinstance(cfg, (str, Path)):
        return load_config(cfg)
    return validate_config(dict(cfg))
