"""Hooks for experiment tracking and model-registry back-ends."""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Protocol, runtime_checkable

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
    """One open logger for one run (what :meth:`Logger.open` returns).

    Core calls these on rank 0 only, through :class:`tunesmith.core.tracking.LoggerSet`;
    an exception in one of them is reported once and that logger is switched off
    for the rest of the run (training goes on).
    """

    def log_params(self, params: dict) -> None:
        """The resolved config, flattened (``training.learning_rate``: 2e-4, ...);
        values are numbers, strings, booleans or None (lists as JSON text)."""

    def log_metrics(self, metrics: dict, step: int) -> None:
        """The values of one logged row at ``step`` (train and eval rows, RL
        curves): numbers, plus ``epoch``; non-numeric values may be present and
        are skipped by loggers that store numbers only."""

    def log_artifact(self, path: Any, kind: str) -> None:
        """A file or folder of the run: ``kind`` is ``config``, ``data_report``,
        ``eval_report``, ``plot``, ``adapter`` or ``model``."""

    def close(self, status: str, result: dict | None) -> None:
        """The run ended: ``status`` is ``finished`` or ``failed``; ``result`` is the
        training result (or the pipeline summary), None when it failed."""


@runtime_checkable
class Logger(Protocol):
    """An experiment logger, selected by ``training.report_to``."""

    name: str
    description: str

    #: opened for every run even when ``report_to`` does not list it (``jsonl``:
    #: metrics.jsonl is the run directory's own record, read by the summary and sweeps)
    always_on: bool = False

    #: opened when the config does not set ``report_to`` at all (``tensorboard``)
    enabled_by_default: bool = False

    OPTIONAL: ClassVar[tuple[str, ...]] = ("always_on", "enabled_by_default")

    def open(self, run: Any, options: Any, resume: bool) -> LoggerRun:
        """Start logging for ``run`` (a :class:`~tunesmith.core.context.RunContext`:
        config, run_dir); ``resume`` is True when the run continues from a
        checkpoint or a later pipeline stage: reopen what the earlier process
        started (the same MLflow run, the same W&B run id) instead of a new one."""


@runtime_checkable
class RegistryStore(Protocol):
    """An open model registry (what :meth:`RegistryBackend.open` returns).

    Versions are dicts: ``version``, ``stage``, ``created_at``, ``artifacts``
    (kind -> absolute path), ``metrics``, ``config_hash``, ``base_model``,
    ``metadata``, ``history``. :class:`tunesmith.model_registry.state.RegistryStore`
    implements all of it on three storage primitives; subclass it.
    """

    #: where the store is, for messages (a folder, a tracking URI and model name)
    location: str

    def load(self) -> dict:
        """The whole state: ``versions``, ``production``, ``canary``, ``staging``,
        ``shares``, ``production_history``, ``events``."""

    def versions(self, *, stage: str | None = None) -> list[dict]: ...

    def get(self, version: str) -> dict: ...

    def production(self) -> dict | None: ...

    def current_path(self, kind: str | None = None) -> Any: ...

    def traffic(self) -> dict[str, float]: ...

    def route(self, request_id: str) -> str | None: ...

    def register(self, artifacts: Any, *, version: str | None = None, metrics: dict | None = None,
                 config_hash: str | None = None, base_model: str | None = None, metadata: dict | None = None,
                 stage: str = "registered") -> dict: ...

    def promote(self, version: str, stage: str, *, share: float | None = None, reason: str | None = None) -> dict: ...

    def rollback(self, *, to: str | None = None, reason: str | None = None) -> dict: ...


@runtime_checkable
class RegistryBackend(Protocol):
    """A model-registry back-end, selected by ``registry.backend``."""

    name: str
    description: str

    def open(self, location: Any, options: Any) -> RegistryStore:
        """The registry at ``location`` (a :class:`~pathlib.Path`: ``registry.path``
        plus ``registry.name``, or ``tunesmith registry -r DIR``) with the back-end's
        validated ``options``; opening is cheap, the store is reached on first use."""
