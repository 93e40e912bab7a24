"""Hooks for exporting trained models."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ClassVar, Protocol, runtime_checkable

from tunesmith._markers import hookspec

if TYPE_CHECKING:  # pragma: no cover
    from pathlib import Path


@hookspec
def register_exporters(register: Callable[..., None]) -> None:
    """Register exporters (PEFT adapter folder, merged model, GGUF, ...).

    :param register: call ``register(exporter, replaces=None)`` once per exporter.

    Selected by ``export: [{format: NAME}]`` or ``tunesmith export --format NAME``.
    An exporter needs ``name``, ``description``, ``Options`` and::

        def export(self, run_dir, output, options, context) -> pathlib.Path

    writing atomically (temporary path, then rename) and refusing an existing
    ``output`` unless ``options.overwrite``.

    Example::

        @hookimpl
        def register_exporters(register):
            register(OnnxExporter())
    """


@hookspec
def after_export(run: Any, exporter: str, path: Path) -> None:
    """Called after an exporter has written its artefact.

    :param run: the :class:`~tunesmith.core.context.RunContext`.
    :param exporter: the exporter's name.
    :param path: where the artefact was written.
    """


@runtime_checkable
class Exporter(Protocol):
    """An exporter. Core reads only the members below."""

    name: str
    description: str

    OPTIONAL: ClassVar[tuple[str, ...]] = ("default_output", "resolve_output")

    def export(self, run_dir: "Path", output: "Path", options: Any, context: Any) -> "Path":
        """Write the artefact atomically at ``output``; return its path."""

    def default_output(self, run_dir: "Path", options: Any) -> "Path":
        """Optional: where the artefact goes without ``-o`` (default RUN/export/NAME)."""

    def resolve_output(self, output: "Path", options: Any) -> "Path":
        """Optional: the real path for a given ``-o`` (a folder gets a file name, ...)."""
