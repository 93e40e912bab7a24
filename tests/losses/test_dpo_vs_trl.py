"""DPO loss, rewards and margins against TRL's own implementation on the same log-probs.

TRL 1.16 computes the DPO loss inside ``DPOTrainer._compute_loss`` (there is no
standalone ``dpo_loss`` any more). We call that method unbound with a minimal
stand-in for the trainer and a model stand-in whose output carries per-token
log-probabilities we choose, so both implementations see exactly the same
numbers. SimPO and conservative (label-smoothed) DPO are checked against TRL's
``CPOTrainer.cpo_loss``.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")

from tunesmith.plugins.losses.dpo import dpo_loss, reward_logs  # noqa: E402


class _Acc:
    device = torch.device("cpu")

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def unwrap_model(self, m):
        return m


def _batch(seed: int, B: int = 6, T: int = 12):
    """Random per-token log-probs of policy and reference for B pairs (2B rows)."""
    g = torch.Generator().manual_seed(seed)
    completion_mask = torch.zeros(2 * B, T, dtype=torch.long)
    for i in range(2 * B):
        start = int(torch.randint(2, 5, (1,), generator=g))
        end = int(torch.randint(start + 1, T + 1, (1,), generator=g))
        completion_mask[i, start:end] = 1
    shift = completion_mask[:, 1:].double()
    policy_tok = -torch.rand(2 * B, T - 1, generator=g, dtype=torch.float64) * 3
    ref_tok = -torch.rand(2 * B, T - 1, generator=g, dtype=torch.float64) * 3
    policy_tok = policy_tok * shift  # TRL's fused head returns 0 outside the completion
    ref_tok = ref_tok * shift
    return completion_mask, policy_tok, ref_tok


def _trl_dpo(loss_type: str, beta: float, completion_mask, policy_tok, ref_tok, label_smoothing: float = 0.0):
    from trl.trainer.dpo_trainer import DPOTrainer

    n_rows, T = completion_mask.shape
    out = SimpleNamespace(
        log_probs=policy_tok,
        entropy=torch.zeros_like(policy_tok),
        mean_logits=torch.zeros_like(policy_tok),
        is_top1=torch.zeros_like(policy_tok, dtype=torch.bool),
    )

    def model(**kw):
        return out

    model.training = True
    ref = ref_tok.sum(1)
    shim = SimpleNamespace(
        model=model,
        accelerator=_Acc(),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        args=SimpleNamespace(),
    )
    inputs = {
        "input_ids": torch.zeros(n_rows, T, dtype=torch.long),
        "attention_mask": torch.ones(n_rows, T, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref[: n_rows // 2],
        "ref_rejected_logps": ref[n_rows // 2 :],
    }
    loss = DPOTrainer._compute_loss(shim, model, inputs, return_outputs=False)
    metrics = {k: v[-1] for k, v in shim._metrics["train"].items()}
    return float(loss), metrics


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("seed", [0, 1])
def test_dpo_matches_trl(loss_type: str, beta: float, seed: int) -> None:
    completion_mask, policy_tok, ref_tok = _batch(seed)
    ls = 0.2 if loss_type == "robust" else 0.0
    trl_loss, trl_metrics = _trl_dpo(loss_type, beta, completion_mask, policy_tok, ref_tok, label_smoothing=ls)

    n = completion_mask.shape[0] // 2
    logps, ref = policy_tok.sum(1), ref_tok.sum(1)
    lengths = completion_mask.sum(1)
    losses, cr, rr = dpo_loss(
        logps[:n], logps[n:], ref[:n], ref[n:], beta=beta, loss_type=loss_type, label_smoothing=ls,
        chosen_lengths=lengths[:n], rejected_lengths=lengths[n:],
    )
    ours = reward_logs(losses, cr, rr)
    assert float(losses.mean()) == pytest.approx(trl_loss, abs=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert ours[key] == pytest.approx(trl_metrics[key], abs=1e-5), key
    # the test can fail: a different beta gives a different loss
    other, _, _ = dpo_loss(
        logps[:n], logps[n:], ref[:n], ref[n:], beta=beta * 2, loss_type=loss_type, label_smoothing=ls,
        chosen_lengths=lengths[:n], rejected_lengths=lengths[n:],
    )
    assert abs(float(other.mean()) - trl_loss) > 1e-4


def _cpo_shim(loss_type: str, beta: float, label_smoothing: float, gamma: float = 0.5):
    return SimpleNamespace(
        alpha=0.0, loss_type=loss_type, beta=beta, label_smoothing=label_smoothing, simpo_gamma=gamma, accelerator=_Acc()
    )


@pytest.mark.parametrize("ls", [0.0, 0.1, 0.3])
def test_conservative_dpo_matches_trl_label_smoothing(ls: float) -> None:
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    completion_mask, policy_tok, ref_tok = _batch(3)
    n = completion_mask.shape[0] // 2
    logps, ref = policy_tok.sum(1), ref_tok.sum(1)
    # CPO's sigmoid loss on (policy - reference) log-ratios is conservative DPO
    ref_losses, ref_cr, ref_rr = CPOTrainer.cpo_loss(_cpo_shim("sigmoid", 0.1, ls), logps[:n] - ref[:n], logps[n:] - ref[n:])
    losses, cr, rr = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], beta=0.1, label_smoothing=ls)
    torch.testing.assert_close(losses, ref_losses, atol=1e-6, rtol=0)
    torch.testing.assert_close(cr, ref_cr, atol=1e-6, rtol=0)
    torch.testing.assert_close(rr, ref_rr, atol=1e-6, rtol=0)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.4])
def test_simpo_matches_trl(gamma: float) -> None:
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    completion_mask, policy_tok, _ = _batch(4)
    n = completion_mask.shape[0] // 2
    logps, lengths = policy_tok.sum(1), completion_mask[:, 1:].sum(1).double()
    avg = logps / lengths  # TRL's SimPO uses average per-token log-probs
    beta = 2.0
    ref_losses, ref_cr, ref_rr = CPOTrainer.cpo_loss(_cpo_shim("simpo", beta, 0.0, gamma), avg[:n], avg[n:])
    losses, cr, rr = dpo_loss(
        logps[:n], logps[n:], beta=beta, loss_type="simpo", simpo_gamma=gamma,
        chosen_lengths=lengths[:n], rejected_lengths=lengths[n:],
    )
    torch.testing.assert_close(losses, ref_losses, atol=1e-6, rtol=0)
    torch.testing.assert_close(cr, ref_cr, atol=1e-6, rtol=0)
    torch.testing.assert_close(rr, ref_rr, atol=1e-6, rtol=0)


def test_sequence_logps_matches_trl_selective_log_softmax(tiny_model_dir) -> None:
    """Our completion log-probs equal TRL's selective_log_softmax over the same real model's logits."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import selective_log_softmax

    from tunesmith.plugins.losses.dpo import sequence_logps

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (4, 10), generator=g)
    cm = torch.zeros(4, 10, dtype=torch.long)
    cm[:, 4:] = 1
    am = torch.ones_like(ids)
    with torch.no_grad():
        ours, n = sequence_logps(model, ids, am, cm)
        logits = model(input_ids=ids, attention_mask=am).logits[:, :-1].float()
        ref = (selective_log_softmax(logits, ids[:, 1:]) * cm[:, 1:]).sum(1)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    assert n.tolist() == [6.0] * 4
