"""ORPO: the loss against TRL's ORPOTrainer (trl.experimental) on the same batch
through the same tiny model, and a run whose held-out preference accuracy rises."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

import tunesmith  # noqa: E402
from tunesmith.plugins.objectives.orpo import ORPOLoss, ORPOOptions, log1mexp  # noqa: E402

from .conftest import TRAIN_PAIRS, metrics, preference_accuracy, run_config, write_jsonl  # noqa: E402


class _Acc:
    device = torch.device("cpu")

    def gather_for_metrics(self, x):
        return x


def _trl_orpo(model, batch: dict, beta: float) -> tuple[float, dict]:
    """TRL's ORPOTrainer.get_batch_loss_metrics, unbound, on our pairs batch."""
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    n = batch["input_ids"].shape[0] // 2
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    trl_batch = {}
    for side, rows in (("chosen", slice(0, n)), ("rejected", slice(n, None))):
        trl_batch[f"{side}_input_ids"] = batch["input_ids"][rows]
        trl_batch[f"{side}_attention_mask"] = batch["attention_mask"][rows]
        trl_batch[f"{side}_labels"] = labels[rows]
    shim = SimpleNamespace(is_encoder_decoder=False, padding_value=0, accelerator=_Acc(), aux_loss_enabled=False, beta=beta,
                           concatenated_inputs=ORPOTrainer.concatenated_inputs, get_batch_logps=ORPOTrainer.get_batch_logps)
    shim.concatenated_forward = lambda m, b: ORPOTrainer.concatenated_forward(shim, m, b)
    shim.odds_ratio_loss = lambda c, r: ORPOTrainer.odds_ratio_loss(shim, c, r)
    loss, metrics_ = ORPOTrainer.get_batch_loss_metrics(shim, model, trl_batch)
    return float(loss), metrics_


@pytest.fixture(scope="module")
def model_and_batch(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.core.models import setup_tokenizer
    from tunesmith.core.preference import PairCollator, tokenize_pairs

    tok = setup_tokenizer(AutoTokenizer.from_pretrained(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    batch = PairCollator(tok.pad_token_id)(tokenize_pairs(tok, TRAIN_PAIRS[:6], max_length=64))
    return model, batch


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_orpo_matches_trl(model_and_batch, beta: float) -> None:
    model, batch = model_and_batch
    with torch.no_grad():
        trl_loss, trl = _trl_orpo(model, batch, beta)
        loss, ours = ORPOLoss().compute(model, batch, ORPOOptions(beta=beta, sft_on="all"), None)
        completion_only, ours_c = ORPOLoss().compute(model, batch, ORPOOptions(beta=beta), None)
    assert float(loss) == pytest.approx(trl_loss, abs=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen"):
        assert ours[key] == pytest.approx(trl[key], abs=1e-5), key
    # the completion-only SFT term (the default) differs from TRL's prompt+completion one; the odds term does not
    assert abs(float(completion_only) - trl_loss) > 1e-3
    assert ours_c["log_odds_ratio"] == pytest.approx(trl["log_odds_ratio"], abs=1e-5)


def test_log1mexp_is_stable() -> None:
    x = torch.tensor([-1e-6, -0.5, -0.7, -5.0, -50.0], dtype=torch.float64)
    torch.testing.assert_close(log1mexp(x), torch.log(1 - torch.exp(x)), rtol=1e-6, atol=1e-15)
    assert torch.isfinite(log1mexp(torch.tensor([-1e-9]))).all()


def _style_pairs(model_dir: Path) -> tuple[list[dict], list[dict]]:
    """Pairs that differ in one style word only, the rejected word being the one the
    base model itself prefers: the base's accuracy is then at most 0.5 by construction,
    and a trained policy must learn the preference (and generalise it to new prompts)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.core.models import setup_tokenizer
    from tunesmith.core.preference import PairCollator, tokenize_pairs
    from tunesmith.plugins.losses.dpo import sequence_logps

    def pairs(good: str, bad: str, sums: list[tuple[int, int]]) -> list[dict]:
        return [{"prompt": [{"role": "user", "content": f"What is {a} plus {b}?"}],
                 "chosen": [{"role": "assistant", "content": f"{good} {a + b}."}],
                 "rejected": [{"role": "assistant", "content": f"{bad} {a + b}."}]} for a, b in sums]

    train_sums = [(a, b) for a in range(1, 5) for b in range(1, 4)]
    held_sums = [(a, b) for a in range(6, 9) for b in range(5, 7)]
    tok = setup_tokenizer(AutoTokenizer.from_pretrained(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    probe = pairs("Sure,", "Nope,", held_sums)
    batch = PairCollator(tok.pad_token_id)(tokenize_pairs(tok, probe, max_length=64))
    with torch.no_grad():
        lp, n = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    avg = lp / n
    base_likes_sure = float((avg[: len(probe)] - avg[len(probe):]).mean()) > 0
    good, bad = ("Nope,", "Sure,") if base_likes_sure else ("Sure,", "Nope,")
    return pairs(good, bad, train_sums), pairs(good, bad, held_sums)


def test_orpo_run_raises_preference_accuracy(tiny_model_dir: Path, tmp_path: Path) -> None:
    from tunesmith.core.session import train

    train_pairs, held_out = _style_pairs(tiny_model_dir)
    data = write_jsonl(tmp_path / "pairs.jsonl", train_pairs)
    run = tmp_path / "run"
    cfg = run_config(tiny_model_dir, data, run, "orpo", losses=[{"name": "orpo", "beta": 0.5}], max_steps=12, save_steps=12)
    result = train(tunesmith.validate_config(cfg))
    assert result["steps"] == 12 and result["pairs"] == 12
    rows = [r for r in metrics(run) if "orpo/nll_loss" in r]
    assert rows[-1]["orpo/nll_loss"] < rows[0]["orpo/nll_loss"]  # the SFT term learns the chosen replies
    assert rows[-1]["orpo/log_odds_ratio"] > rows[0]["orpo/log_odds_ratio"]
    acc = preference_accuracy(run, held_out, implicit_reward=False)
    print("orpo held-out preference accuracy", acc)
    assert acc["base_margin"] < 0 and acc["base_accuracy"] <= 0.5, acc  # the base prefers the rejected style
    assert acc["accuracy"] > 0.5 and acc["margin"] > 0, acc
    assert (run / "checkpoints" / "checkpoint-12" / "COMPLETE").exists()
