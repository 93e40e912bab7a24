"""Hooks for where a base model comes from and how it is made trainable."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

from tunesmith._markers import hookspec

if TYPE_CHECKING:  # pragma: no cover
    from pathlib import Path


@hookspec
def register_model_sources(register: Callable[..., None]) -> None:
    """Register model sources: where a base model comes from.

    :param register: call ``register(source, replaces=None)`` once per source.

    A source is selected by ``model.source`` in the config. It needs ``name``,
    ``description``, ``Options`` (the rest of the ``model:`` section) and::

        def resolve(self, options) -> pathlib.Path:
            '''Return a local folder that transformers can load (config.json,
            safetensors weights, tokenizer files). Download or convert here, cache
            the result, write it atomically; never execute remote code.'''

    Example::

        @hookimpl
        def register_model_sources(register):
            register(MyBucketSource())
    """


@hookspec
def register_peft_methods(register: Callable[..., None]) -> None:
    """Register PEFT methods: how a loaded model is made trainable.

    :param register: call ``register(method, replaces=None)`` once per method.

    Selected by ``peft.method``. A method needs ``name``, ``description``,
    ``Options`` (the rest of the ``peft:`` section), ``mergeable`` (bool) and::

        def apply(self, model, options, context) -> model
            '''Wrap or modify the model; only the parameters to train keep
            ``requires_grad``.'''
        def save(self, model, path) -> None       # safetensors only
        def load(self, model, path, options) -> model

    Example::

        @hookimpl
        def register_peft_methods(register):
            register(FastLoRA(), replaces="lora")
    """


@runtime_checkable
class ModelSource(Protocol):
    name: str
    description: str

    def resolve(self, options: Any) -> "Path": ...


@runtime_checkable
class PeftMethod(Protocol):
    name: str
    description: str
    mergeable: bool

    def apply(self, model: Any, options: Any, context: Any) -> Any: ...
