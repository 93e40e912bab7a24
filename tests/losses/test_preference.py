"""The dpo and reward objectives end to end on the tiny model: config -> run directory."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

torch = pytest.importorskip("torch")

os.environ.setdefault("TUNESMITH_NO_PROGRESS", "1")

PAIRS = [
    {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"What is {a} plus {b}?"}],
        "chosen": [{"role": "assistant", "content": f"{a + b}."}],
        "rejected": [{"role": "assistant", "content": f"I think it is {a * b + 7}, maybe."}],
    }
    for a in range(1, 4)
    for b in range(1, 3)
]
CHAT = [
    {"messages": [{"role": "user", "content": f"Name the number {i}."}, {"role": "assistant", "content": f"{i}"}]}
    for i in range(8)
]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def make_cfg(tmp_path: Path, tiny_model_dir: Path) -> Any:
    import tunesmith

    pairs = _jsonl(tmp_path / "pairs.jsonl", PAIRS)

    def _make(name: str = "cfg", *, objective: str = "dpo", losses: list | None = None, peft: dict | None = None,
              training: dict | None = None, raw: bool = False) -> Any:
        t = {"max_steps": 10, "learning_rate": 5e-3, "batch_size": 6, "gradient_accumulation_steps": 1,
             "max_length": 64, "logging_steps": 1, "save_steps": 0, "eval_steps": 0, "warmup_ratio": 0.0,
             "gradient_checkpointing": False, "report_to": [], "early_stopping": None, "lr_scheduler": "constant"}
        t.update(training or {})
        cfg = {
            "model": {"source": "hf", "path": str(tiny_model_dir)},
            "data": {"path": str(pairs)},
            "objective": objective,
            "peft": peft or {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
            "training": t,
            "output_dir": str(tmp_path / f"run-{name}"),
        }
        if losses is not None:
            cfg["losses"] = losses
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
        tunesmith.reset_plugins()
        return path if raw else tunesmith.load_config(path)

    return _make


def _metrics(run_dir: str) -> list[dict]:
    return [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_dpo_objective_with_ewc_trains_and_logs(make_cfg, tmp_path) -> None:
    """DPO + EWC in one run: both terms logged, rewards logged, Fisher stored as safetensors."""
    from safetensors.torch import load_file

    from tunesmith.core.session import train

    chat = _jsonl(tmp_path / "general.jsonl", CHAT)
    cfg = make_cfg("dpo-ewc", losses=[{"name": "dpo", "beta": 0.1}, {"name": "ewc", "weight": 100.0, "data": str(chat), "batches": 2}])
    result = train(cfg)
    assert result["objective"] == "dpo" and result["steps"] == 10
    assert result["final/rewards/accuracies"] > 0.5
    rows = _metrics(result["run_dir"])
    logged = set().union(*rows)
    for key in ("loss", "loss/dpo", "loss/ewc", "dpo/rewards/chosen", "dpo/rewards/rejected",
                "dpo/rewards/margins", "dpo/rewards/accuracies"):
        assert key in logged, key
    ewc_terms = [r["loss/ewc"] for r in rows if "loss/ewc" in r]
    assert ewc_terms[0] == pytest.approx(0.0, abs=1e-12) and max(ewc_terms) > 0
    fisher = load_file(str(Path(result["run_dir"]) / "ewc" / "fisher.safetensors"))
    assert fisher and all("lora_" in k for k in fisher)
    info = json.loads((Path(result["run_dir"]) / "final" / "tunesmith.json").read_text())
    assert info["objective"] == "dpo"
    assert (Path(result["run_dir"]) / "final" / "adapter_model.safetensors").exists()


def test_dpo_objective_with_qlora(make_cfg) -> None:
    from tunesmith.core.session import train

    cfg = make_cfg("dpo-qlora", peft={"method": "qlora", "r": 8, "alpha": 16, "dropout": 0.0})
    result = train(cfg)
    assert result["final/rewards/accuracies"] > 0.5


def test_reward_objective_trains_a_scalar_head(make_cfg) -> None:
    from tunesmith.core.session import train
    from tunesmith.plugins.rewards.reward_model import load_reward_model

    cfg = make_cfg("rm", objective="reward", training={"learning_rate": 1e-2, "max_steps": 12})
    result = train(cfg)
    assert result["final/rewards/accuracies"] > 0.5
    final = Path(result["run_dir"]) / "final"
    model, tok = load_reward_model(final)  # the RL side loads what we saved
    from tunesmith.core.preference import PairCollator, tokenize_pairs

    batch = PairCollator(tok.pad_token_id)(tokenize_pairs(tok, PAIRS, max_length=64))
    with torch.no_grad():
        r = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    n = len(PAIRS)
    assert float((r[:n] > r[n:]).float().mean()) > 0.5


@pytest.mark.parametrize(
    "objective,losses,match",
    [
        ("sft", [{"name": "dpo"}], "needs chosen/rejected pairs"),
        ("dpo", [{"name": "causal_lm"}, {"name": "dpo"}], "needs token sequences"),
        ("dpo", [{"name": "ewc", "data": "x.jsonl"}], "needs a loss that reads chosen/rejected pairs"),
        ("reward", [{"name": "dpo"}, {"name": "causal_lm"}], "causal_lm"),
    ],
)
def test_loss_and_objective_mismatch_is_a_config_error(make_cfg, objective, losses, match) -> None:
    from tunesmith.core.errors import ConfigError
    from tunesmith.core.plugins import get_registries
    from tunesmith.core.session import resolve_losses

    cfg = make_cfg("bad", objective=objective, losses=losses)
    with pytest.raises(ConfigError, match=match) as info:
        resolve_losses(cfg, get_registries())
    assert "losses" in str(info.value)
