"""Hooks for serving: who answers requests for a base model and its adapters."""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Protocol, runtime_checkable

from tunesmith._markers import hookspec


@hookspec
def register_serving_engines(register: Callable[..., None]) -> None:
    """Register serving engines: in-process transformers (built in), llama.cpp, vLLM, ...

    :param register: call ``register(engine, replaces=None)`` once per engine.

    Selected by ``tunesmith serve --engine NAME``. See :class:`ServingEngine`.

    Example::

        @hookimpl
        def register_serving_engines(register):
            register(TGIEngine())
    """


@runtime_checkable
class ServingEngine(Protocol):
    """A serving engine. ``tunesmith serve`` reads only the members below.

    ``spec`` is a :class:`tunesmith.serving.spec.ServeSpec`: ``base`` (a model folder,
    a .gguf file or a model-source name, as given), ``adapters`` (name -> path, as
    given), ``host``, ``port``, ``api_key``, ``registry``, ``log_level`` and
    ``registries`` (the plugin registries, to resolve model sources). ``options`` is an
    instance of the engine's pydantic ``Options`` (the ``--opt KEY=VALUE`` pairs and the
    engine flags of ``tunesmith serve``; ``Options`` should forbid unknown keys).

    The command calls ``check`` first and refuses to start while it reports a
    problem; with ``--dry-run`` it then prints ``command`` (or, for an in-process
    engine, what it would serve) instead of calling ``serve``.
    """

    name: str
    description: str

    OPTIONAL: ClassVar[tuple[str, ...]] = ("check", "command")

    def serve(self, spec: Any, options: Any) -> None:
        """Serve ``spec`` until stopped (in this process, or by replacing it with the
        engine's server program)."""

    def check(self, spec: Any, options: Any) -> list[str]:
        """Optional: every reason the engine cannot serve ``spec``, each naming the
        adapter (``"adapter 'sql': LoRA rank 64 > --max-lora-rank 16"``); ``[]`` when it can.
        Runs before anything heavy loads."""

    def command(self, spec: Any, options: Any) -> list[str]:
        """Optional: for an engine that runs another program, its argv (``serve``
        executes it; ``--dry-run`` prints it). Secrets go in the environment, not here."""
