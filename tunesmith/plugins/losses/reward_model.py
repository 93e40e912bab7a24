"""Pairwise (Bradley-Terry) reward-model loss: the first half of RLHF.

The model is a sequence classifier with one output (a scalar head on the last
non-padding token, ``AutoModelForSequenceClassification(num_labels=1)``), fed
the pairs collator's batch: B chosen rows, then B rejected rows. With rewards
``r_c`` and ``r_r``::

    loss = -log sigmoid(r_c - r_r - margin) + center * mean((r_c + r_r)^2)

as TRL's ``RewardTrainer`` computes it (``margin`` from the batch when the data
has one per pair; ``center_rewards_coefficient`` keeps rewards near zero).
Logged: ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
``rewards/accuracies``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tunesmith import hookimpl


class RewardOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    center_rewards_coefficient: float | None = Field(
        None, ge=0, description="Weight of mean((r_chosen + r_rejected)^2), which keeps rewards centred (None: off)."
    )
    use_margin: bool = Field(True, description="Subtract the pair's 'margin' (metadata) from the reward difference when the data has one.")


def bradley_terry_loss(
    rewards_chosen: Any, rewards_rejected: Any, *, margin: Any = None, center_rewards_coefficient: float | None = None
) -> Any:
    """Mean pairwise loss ``-log sigmoid(r_c - r_r - margin)`` (+ the centring term)."""
    import torch
    import torch.nn.functional as F

    diff = rewards_chosen - rewards_rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * torch.mean((rewards_chosen + rewards_rejected) ** 2)
    return loss


def pair_rewards(model: Any, batch: dict) -> tuple[Any, Any]:
    """Scalar rewards of the chosen and rejected rows of a pairs batch."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    rewards = out.logits.squeeze(-1).float()
    n = rewards.shape[0] // 2
    return rewards[:n], rewards[n:]


class RewardModelLoss:
    name = "reward_model"
    description = "Pairwise Bradley-Terry loss for a scalar-head reward model on chosen/rejected pairs."
    requires = "pairs"
    Options = RewardOptions

    def compute(self, model: Any, batch: dict, options: RewardOptions, context: Any) -> tuple[Any, dict]:
        rc, rr = pair_rewards(model, batch)
        margin = batch.get("margin") if options.use_margin else None
        loss = bradley_terry_loss(rc, rr, margin=margin, center_rewards_coefficient=options.center_rewards_coefficient)
        rc_d, rr_d = rc.detach(), rr.detach()
        logs = {
            "rewards/chosen": float(rc_d.mean()),
            "rewards/rejected": float(rr_d.mean()),
            "rewards/margins": float((rc_d - rr_d).mean()),
            "rewards/accuracies": float((rc_d > rr_d).float().mean()),
        }
        return loss, logs


@hookimpl
def register_losses(register: Any) -> None:
    register(RewardModelLoss())
