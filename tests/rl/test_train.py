"""GRPO and PPO on a tiny model: the mean reward of a rule reward with a known optimum
(1.0: the completion starts with one of the words the base model says ~20% of the
time) rises within a few steps; metrics, plot, final adapter and resume are checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tunesmith
from tunesmith.core.errors import ConfigError

from .conftest import rl_config


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]


def _check_run(run: Path, result: dict, steps: int) -> list[dict]:
    rows = [r for r in _rows(run) if "reward" in r]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for r in rows:
        for key in ("reward", "kl", "policy_loss", "response_length"):
            assert isinstance(r[key], float), (key, r)
        assert 0.0 <= r["reward"] <= 1.0 and r["response_length"] > 0
    assert (run / "plots" / "rl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    info = json.loads((run / "final" / "tunesmith.json").read_text())
    assert info["objective"] in ("grpo", "ppo") and info["peft"]["method"] == "lora"
    assert (run / "final" / "adapter_model.safetensors").exists()
    assert result["steps"] == steps
    return rows


def _rises(rows: list[dict], rl_target: tuple[str, float]) -> None:
    rewards = [r["reward"] for r in rows]
    start = sum(rewards[:2]) / 2
    end = sum(rewards[-2:]) / 2
    # the base model hits the pattern ~rl_target[1] of the time; the policy must clearly beat that
    assert end > start + 0.2, rewards
    assert end > rl_target[1] + 0.25, (rewards, rl_target)


def test_grpo_reward_rises(rl_model_dir: Path, rl_target: tuple[str, float], prompts_file: Path, tmp_path: Path) -> None:
    from tunesmith.core.models import load_trained
    from tunesmith.core.session import train

    pattern, _share = rl_target
    cfg = tunesmith.validate_config(rl_config(rl_model_dir, prompts_file, tmp_path / "run", "grpo", pattern, batch_size=16, num_generations=4, kl_coef=0.04))
    cfg.training.max_steps = 6
    cfg.training.save_steps = 3
    result = train(cfg)
    rows = _check_run(tmp_path / "run", result, 6)
    # TRL's trainer gets tunesmith's checkpoints: staged + renamed, no pickle
    ckpts = sorted(p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith("checkpoint-"))
    assert [c.name for c in ckpts] == ["checkpoint-3", "checkpoint-6"]
    for c in ckpts:
        names = {p.name for p in c.iterdir()}
        assert {"COMPLETE", "optimizer.safetensors", "scheduler.json", "rng_state.safetensors", "training_args.json"} <= names, names
        assert not [n for n in names if n.endswith((".pt", ".pth", ".bin"))], names
    _rises(rows, rl_target)
    assert rows[-1]["kl"] > 0  # the policy moved away from the reference (adapter disabled)
    assert result["reward_end"] > result["reward_start"]
    # the saved adapter is the trained policy: it now says the rewarded word far more often
    model, tok, info = load_trained(tmp_path / "run")
    assert info["objective"] == "grpo"
    assert set(model.peft_config) == {"default"}  # TRL's frozen 'ref' copy is not saved


def test_ppo_reward_rises_and_resumes(rl_model_dir: Path, rl_target: tuple[str, float], prompts_file: Path, tmp_path: Path) -> None:
    from tunesmith.core.session import train

    pattern, _share = rl_target
    data = rl_config(rl_model_dir, prompts_file, tmp_path / "run", "ppo", pattern, batch_size=16, mini_batch_size=8, ppo_epochs=2)
    data["training"].update(learning_rate=5e-3, max_steps=6, save_steps=3)
    result = train(tunesmith.validate_config(data))
    rows = _check_run(tmp_path / "run", result, 6)
    _rises(rows, rl_target)
    assert rows[-1]["kl"] > 0 and all("value_loss" in r and "kl_coef" in r for r in rows)
    assert (tmp_path / "run" / "value_head.safetensors").exists()
    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint-3"
    assert {"adapter_model.safetensors", "value_head.safetensors", "optimizer.safetensors", "trainer_state.json"} <= {p.name for p in ckpt.iterdir()}
    # resume from step 3 to step 4: the metrics keep steps 1-3 of the first run and add step 4
    data["training"]["max_steps"] = 4
    first = _rows(tmp_path / "run")
    result2 = train(tunesmith.validate_config(data), resume=True)
    rows2 = _rows(tmp_path / "run")
    assert result2["resumed_from"].endswith("checkpoint-3") and result2["steps"] == 4
    assert [r["step"] for r in rows2] == [1, 2, 3, 4]
    assert rows2[:3] == first[:3]


def test_ppo_with_a_reward_model(rl_model_dir: Path, prompts_file: Path, tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    """The RLHF path: a sequence-classification reward model scores the rollouts."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from tunesmith.core.session import train

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                    num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=tok.pad_token_id))
    rm.save_pretrained(tmp_path / "rm", safe_serialization=True)
    tok.save_pretrained(tmp_path / "rm")
    data = rl_config(rl_model_dir, prompts_file, tmp_path / "run", "ppo", "x", batch_size=4, mini_batch_size=2, ppo_epochs=1, max_new_tokens=4)
    data["objective"]["rewards"] = []
    data["objective"]["reward_model"] = str(tmp_path / "rm")
    data["training"].update(learning_rate=1e-3, max_steps=2)
    result = train(tunesmith.validate_config(data))
    rows = [r for r in _rows(tmp_path / "run") if "reward" in r]
    assert len(rows) == 2 and all("rewards/reward_model/mean" in r for r in rows)
    assert result["steps"] == 2


def test_config_errors(rl_model_dir: Path, prompts_file: Path, tmp_path: Path) -> None:
    from tunesmith.core.session import train

    bad = rl_config(rl_model_dir, prompts_file, tmp_path / "run", "grpo", "x", batch_size=6, num_generations=4)
    with pytest.raises(ConfigError, match="multiple of objective.num_generations"):
        train(tunesmith.validate_config(bad))
    none = rl_config(rl_model_dir, prompts_file, tmp_path / "run", "ppo", "x")
    none["objective"]["rewards"] = []
    with pytest.raises(ConfigError, match="no reward"):
        train(tunesmith.validate_config(none))
