"""Hooks for serving: who answers requests for a base model and its adapters."""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

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
    name: str
    description: str

    def serve(self, spec: Any, options: Any) -> None:
        """Serve ``spec`` (base model, adapters, host, port, API key) until stopped."""
