"""Hooks for evaluation."""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

from tunesmith._markers import hookspec


@hookspec
def register_evaluators(register: Callable[..., None]) -> None:
    """Register evaluators (perplexity, generation metrics, forgetting, ...).

    :param register: call ``register(evaluator, replaces=None)`` once per evaluator.

    Listed under ``evaluation:`` in the config. An evaluator needs ``name``,
    ``description``, ``Options`` and::

        def evaluate(self, model, tokenizer, options, context) -> dict

    returning JSON-serialisable metrics (``{"metrics": {...}, "samples": [...]}``).

    Example::

        @hookimpl
        def register_evaluators(register):
            register(ToxicityEvaluator())
    """


@hookspec
def after_evaluation(run: Any, evaluator: str, results: dict) -> None:
    """Called after each evaluator has run.

    :param run: the :class:`~tunesmith.core.context.RunContext`.
    :param evaluator: the evaluator's name.
    :param results: what it returned.
    """


@runtime_checkable
class Evaluator(Protocol):
    name: str
    description: str

    def evaluate(self, model: Any, tokenizer: Any, options: Any, context: Any) -> dict: ...
