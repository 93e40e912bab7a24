"""The Bradley-Terry reward-model loss against TRL's RewardTrainer on the same rewards."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

from tunesmith.plugins.losses.reward_model import RewardModelLoss, RewardOptions  # noqa: E402


class _Acc:
    def gather(self, x):
        return x

    gather_for_metrics = gather


@pytest.mark.parametrize("center", [None, 0.01])
@pytest.mark.parametrize("with_margin", [False, True])
def test_reward_loss_matches_trl(center, with_margin) -> None:
    from trl.trainer.reward_trainer import RewardTrainer

    g = torch.Generator().manual_seed(0)
    B = 5
    logits = torch.randn(2 * B, 1, generator=g, dtype=torch.float64)

    class Model:
        training = True

        def __call__(self, **kw):
            return SimpleNamespace(logits=logits)

    model = Model()
    inputs = {"input_ids": torch.zeros(2 * B, 4, dtype=torch.long), "attention_mask": torch.ones(2 * B, 4, dtype=torch.long)}
    if with_margin:
        inputs["margin"] = torch.rand(B, generator=g, dtype=torch.float64)
    shim = SimpleNamespace(
        model=model, args=SimpleNamespace(center_rewards_coefficient=center), accelerator=_Acc(),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    trl_loss = RewardTrainer.compute_loss(shim, model, dict(inputs))
    loss, logs = RewardModelLoss().compute(model, dict(inputs), RewardOptions(center_rewards_coefficient=center), None)
    assert float(loss) == pytest.approx(float(trl_loss), abs=1e-6)
    assert logs["rewards/accuracies"] == pytest.approx(shim._metrics["train"]["accuracy"][-1], abs=1e-6)
    assert logs["rewards/margins"] == pytest.approx(shim._metrics["train"]["margin"][-1], abs=1e-6)
