"""Hooks for training: losses, reward functions and the training lifecycle."""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Protocol, runtime_checkable

from tunesmith._markers import hookspec


@hookspec
def register_losses(register: Callable[..., None]) -> None:
    """Register loss terms; the config lists them with weights and the trainer sums them.

    :param register: call ``register(loss, replaces=None)`` once per loss.

    A loss needs ``name``, ``description``, ``Options``, ``requires`` (the batch
    kind it needs: ``"tokens"`` or ``"pairs"``; ``None`` for a regulariser that
    reads no batch) and::

        def setup(self, model, options, context) -> None      # optional
        def compute(self, model, batch, options, context) -> tuple[Tensor, dict[str, float]]

    returning the unweighted loss and the values to log.

    Example::

        @hookimpl
        def register_losses(register):
            register(FocalLoss())
    """


@hookspec
def register_reward_functions(register: Callable[..., None]) -> None:
    """Register reward functions for policy optimisation (PPO, GRPO).

    :param register: call ``register(reward, replaces=None)`` once per reward.

    A reward needs ``name``, ``description``, ``Options`` and::

        def score(self, prompts: list[str], completions: list[str], rows: list[dict], options, context) -> list[float]

    Example::

        @hookimpl
        def register_reward_functions(register):
            register(CompilesReward())
    """


@hookspec(firstresult=True)
def launch_training(cfg: Any, registries: Any, resume: bool, run_dir: Any) -> dict | None:
    """Who runs a training whose config asks for other processes (``training.distributed``).

    :param cfg: the validated config.
    :param registries: the run's registries.
    :param resume: continue from the last complete checkpoint.
    :param run_dir: the run directory override, or None.
    :return: rank 0's result when the implementation started the processes and the
        training ran there; ``None`` to train in this process (the first non-None
        result wins; the built-in is ``tunesmith.distributed``: torchrun and Ray).
    """


@hookspec
def before_train(run: Any) -> None:
    """Called once before the first training step.

    :param run: the :class:`tunesmith.core.context.RunContext` (config, run
        directory, model, tokenizer).
    """


@hookspec
def after_step(run: Any, step: int, logs: dict) -> bool | None:
    """Called after every optimiser step with the values logged at that step.

    :param run: the :class:`~tunesmith.core.context.RunContext`.
    :param step: the global step just finished.
    :param logs: loss terms, learning rate and any other logged values.
    :return: ``True`` to stop training after this step (early stopping);
        every implementation is called, and any ``True`` stops.
    """


@hookspec
def after_log(run: Any, step: int, logs: dict) -> None:
    """Called each time a training run logs a row (train or eval values), on rank 0.

    :param run: the :class:`~tunesmith.core.context.RunContext`.
    :param step: the global step the row belongs to.
    :param logs: the logged values (``loss``, ``learning_rate``, ``eval_loss``,
        reward curves, ...). Call ``run.request_stop(reason)`` to stop training
        (a sweep prunes a trial this way).
    """


@hookspec
def after_train(run: Any, result: dict) -> None:
    """Called once when training has finished.

    :param run: the :class:`~tunesmith.core.context.RunContext`.
    :param result: final metrics (``train_loss``, ``steps``, ``runtime_s``, ...)
        and ``output_path`` of the saved adapter or model.
    """


@hookspec
def on_train_error(run: Any, error: BaseException) -> None:
    """Called when training fails, before the error propagates.

    :param run: the :class:`~tunesmith.core.context.RunContext`.
    :param error: the exception.
    """


@runtime_checkable
class Loss(Protocol):
    """A loss term. Core reads only the members below."""

    name: str
    description: str

    #: the batch kind it reads (``"tokens"``, ``"pairs"``, ...), matched against the
    #: objective's ``batch_kind``; ``None`` for a regulariser that reads no batch
    requires: str | None = None
    #: the value is already normalised by ``batch.num_items_in_batch`` (the trainer
    #: then scales it by the world size only); otherwise it is divided by the
    #: accumulation steps
    scaled_for_accumulation: bool = False

    OPTIONAL: ClassVar[tuple[str, ...]] = ("requires", "scaled_for_accumulation", "setup")

    def compute(self, model: Any, batch: Any, options: Any, context: Any) -> tuple[Any, dict]:
        """The unweighted loss tensor and the values to log."""

    def setup(self, model: Any, options: Any, context: Any) -> None:
        """Optional: once before training (EWC computes its Fisher information here)."""


@runtime_checkable
class RewardFunction(Protocol):
    name: str
    description: str

    def score(self, prompts: list[str], completions: list[str], rows: list[dict], options: Any, context: Any) -> list[float]:
        """One reward per completion (the rows are the prompt rows, with ``answer``)."""
