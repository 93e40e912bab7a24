"""Hooks for experiment tracking and model-registry back-ends."""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

from tunesmith._markers import hookspec


@hookspec
def register_loggers(register: Callable[..., None]) -> None:
    """Register experiment loggers: where a run's parameters, metrics and artefacts go.

    :param register: call ``register(logger, replaces=None)`` once per logger.

    Selected by ``training.report_to`` (names, or ``{name: ..., option: ...}``
    mappings); an unknown name is a config error that lists the installed
    loggers. Core opens each selected logger once per run on rank 0, around every
    objective (they hang on the training session, not on one trainer). See
    :class:`Logger`.

    Example::

        @hookimpl
        def register_loggers(register):
            register(CometLogger())
    """


@hookspec
def register_registry_backends(register: Callable[..., None]) -> None:
    """Register model-registry back-ends: where model versions, stages and metrics live.

    :param register: call ``register(backend, replaces=None)`` once per back-end.

    Selected by ``registry.backend`` (default ``local``, a versions.json file).
    See :class:`RegistryBackend`.

    Example::

        @hookimpl
        def register_registry_backends(register):
            register(SageMakerRegistry())
    """


@runtime_checkable
class LoggerRun(Protocol):
    """One open logger for one run (what :meth:`Logger.open` returns)."""

    def log_params(self, params: dict) -> None:
        """The resolved config, flattened (``training.learning_rate``: 2e-4, ...)."""

    def log_metrics(self, metrics: dict, step: int) -> None:
        """Numeric values logged at ``step`` (train and eval rows, RL curves)."""

    def log_artifact(self, path: Any, kind: str) -> None:
        """A file or folder of the run: ``kind`` is ``config``, ``data_report``,
        ``eval_report``, ``plot``, ``adapter`` or ``model``."""

    def close(self, status: str, result: dict | None) -> None:
        """The run ended: ``status`` is ``finished`` or ``failed``."""


@runtime_checkable
class Logger(Protocol):
    name: str
    description: str

    def open(self, run: Any, options: Any) -> LoggerRun:
        """Start (or, on resume, reopen) logging for ``run`` (a RunContext)."""


@runtime_checkable
class RegistryBackend(Protocol):
    name: str
    description: str

    def open(self, options: Any, base_dir: Any) -> Any:
        """A store object with ``register``, ``list``, ``show``, ``promote``,
        ``rollback`` and ``production_path`` (see docs/registry.md)."""
