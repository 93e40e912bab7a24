"""Hooks for training objectives: what a run optimises and how.

An objective owns only what makes it different (its data, its batches, its
trainer or loop); core's :class:`~tunesmith.core.session.TrainingSession` owns
what every objective shares: the run directory, seeding, resume from the last
complete checkpoint, rank-0-only writes, the result, the final artefact, the
loggers and the lifecycle hooks.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Protocol, runtime_checkable

from tunesmith._markers import hookspec


@hookspec
def register_objectives(register: Callable[..., None]) -> None:
    """Register training objectives (sft, cpt, dpo, reward, grpo, ppo, ...).

    :param register: call ``register(objective, replaces=None)`` once per objective.

    Selected by ``objective:`` in the config, either a name (``objective: dpo``)
    or a mapping whose other keys are the objective's ``Options``
    (``objective: {name: grpo, num_generations: 8, rewards: [...]}``). See
    :class:`Objective` for what an objective provides.

    Example::

        @hookimpl
        def register_objectives(register):
            register(SimPOObjective())
    """


@runtime_checkable
class Objective(Protocol):
    """A training objective.

    ``train(session, options)`` runs the training and returns the objective's own
    result fields (``train_loss``, ``steps``, reward curve, ...); the session adds
    ``run_dir``, ``output_path``, ``objective``, ``resumed_from`` and
    ``stop_reason``, writes ``train_result.json`` and calls ``after_train``.
    """

    name: str
    description: str

    #: the kind of batch it trains on, matched against each loss plugin's ``requires``:
    #: ``"tokens"`` (token sequences with labels), ``"pairs"`` (chosen/rejected), or
    #: another kind its own losses declare; ``None`` if it uses no loss plugins
    batch_kind: str | None = "tokens"

    #: the loss plugins used when the config lists no ``losses:`` (``()``: none)
    default_losses: tuple[str, ...] = ()

    #: ``learning_rate: auto`` is the PEFT method's ``default_learning_rate`` times
    #: this (DPO: 0.1), before the size rules
    learning_rate_scale: float = 1.0

    #: the optional members below; core supplies the defaults shown
    OPTIONAL: ClassVar[tuple[str, ...]] = ("batch_kind", "default_losses", "learning_rate_scale", "check")

    def train(self, session: Any, options: Any) -> dict:
        """Train inside ``session`` (a :class:`~tunesmith.core.session.TrainingSession`)."""

    def check(self, cfg: Any, options: Any, registries: Any) -> None:
        """Optional: refuse a config before anything heavy loads (raise ConfigError
        with ``key=``); the losses are checked against ``batch_kind`` by core."""
