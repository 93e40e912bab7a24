"""``objective: reward`` - a reward model from chosen/rejected pairs.

A one-output sequence-classification head over the base model, trained with the
pairwise Bradley-Terry loss (``reward_model``). ``RUN/final`` loads with
``tunesmith.plugins.rewards.reward_model.load_reward_model`` and serves as the
``reward_model`` reward of the RL objectives.
"""

from __future__ import annotations

from typing import Any

from tunesmith import hookimpl


class RewardModel:
    name = "reward"
    description = "Reward model: scalar head trained with the Bradley-Terry loss on chosen/rejected pairs"
    batch_kind = "pairs"
    default_losses = ("reward_model",)

    def train(self, session: Any, options: Any) -> dict:
        from tunesmith.core.preference import train_on_pairs

        return train_on_pairs(session, head="sequence_classification")


@hookimpl
def register_objectives(register: Any) -> None:
    register(RewardModel())
