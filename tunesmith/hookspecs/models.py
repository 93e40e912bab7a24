"""Hooks for where a base model comes from and how it is made trainable."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ClassVar, Protocol, runtime_checkable

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
    """A model source. Core reads only the members below."""

    name: str
    description: str

    OPTIONAL: ClassVar[tuple[str, ...]] = ("tokenizer_dir",)

    def resolve(self, options: Any) -> "Path":
        """A local folder transformers can load (config, safetensors weights, tokenizer)."""

    def tokenizer_dir(self, options: Any) -> "Path | None":
        """Optional: a folder with the tokenizer alone, found without resolving the
        weights (data cleaning counts tokens this way before any model loads)."""


@runtime_checkable
class PeftMethod(Protocol):
    """A PEFT method. Core reads only the members below."""

    name: str
    description: str

    #: ``merge`` folds the trained weights into a plain standalone model
    mergeable: bool = False
    #: ``save`` writes a complete model (full fine-tuning), not an adapter
    saves_full_model: bool = False
    #: the base learning rate of ``learning_rate: auto`` (before the size rules)
    default_learning_rate: float = 1e-4

    OPTIONAL: ClassVar[tuple[str, ...]] = (
        "mergeable", "saves_full_model", "default_learning_rate",
        "quantization_config", "peft_config", "prepare", "callbacks", "merge",
    )

    def apply(self, model: Any, options: Any, context: Any) -> Any:
        """Wrap or modify the model; only the parameters to train keep ``requires_grad``."""

    def save(self, model: Any, path: "Path") -> None:
        """Write the trained weights (adapter or model) as safetensors into ``path``."""

    def load(self, model: Any, path: "Path", options: Any = None) -> Any:
        """Put saved weights onto a freshly loaded base ``model``; return the model."""

    def quantization_config(self, options: Any) -> Any:
        """Optional: a transformers quantisation config the base must load with (QLoRA)."""

    def peft_config(self, model: Any, options: Any, context: Any) -> Any:
        """Optional: the ``peft`` config (methods built on the peft library); core uses it
        to give reward models a ``SEQ_CLS`` task and a trained ``score`` head."""

    def prepare(self, model: Any, options: Any, context: Any) -> Any:
        """Optional: ready the base before the adapter goes on (QLoRA's k-bit preparation)."""

    def callbacks(self, options: Any, context: Any) -> list:
        """Optional: transformers ``TrainerCallback``\ s the run adds (gradual unfreezing)."""

    def merge(self, model: Any) -> Any:
        """Optional (with ``mergeable``): the model with the trained weights folded in,
        a plain transformers model that ``save_pretrained`` writes."""
