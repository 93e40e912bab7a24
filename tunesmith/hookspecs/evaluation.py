"""Hooks for evaluation."""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Protocol, runtime_checkable

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
    """An evaluator. Core reads only the members below."""

    name: str
    description: str
    #: metrics where lower is better (perplexity, latency); every other metric is
    #: higher-is-better, except the neutral ones
    lower_is_better: tuple[str, ...] = ()
    #: counts and context (rows, tokens): shown, never called better or worse
    neutral_metrics: tuple[str, ...] = ()
    #: its place among the evaluators that run when the config lists none; ``None``:
    #: it runs only when listed
    default_order: int | None = None

    OPTIONAL: ClassVar[tuple[str, ...]] = ("lower_is_better", "neutral_metrics", "default_order")

    def evaluate(self, model: Any, tokenizer: Any, options: Any, context: Any) -> dict:
        """``{"metrics": {...}, "samples": [...]}`` (JSON-serialisable)."""
