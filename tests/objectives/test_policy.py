"""RLOO and the GRPO variants (loss types, GSPO) on the tiny RL policy of tests/rl:
the mean reward of a rule reward with a known optimum (the completion starts with
one of the words the base model says ~15% of the time) rises within a few steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

import tunesmith  # noqa: E402
from tunesmith.core.errors import ConfigError  # noqa: E402

from .conftest import metrics  # noqa: E402

#: kept small: TRL's chunked log-prob kernel is slow on CPU (~1-2 s a step at this size). The
#: completions all have max_new_tokens (2) tokens here, so grpo, bnpo and dapo make the same update
#: (dr_grpo's constant differs); that the options reach TRL is checked on its saved arguments.
STEPS, BATCH, LR = 6, 8, 1e-2
VARIANTS = {
    "grpo": ("grpo", {"loss_type": "grpo"}),
    "dr_grpo": ("grpo", {"loss_type": "dr_grpo", "scale_rewards": "none"}),
    "dapo": ("grpo", {"loss_type": "dapo", "epsilon_high": 0.28}),
    "bnpo": ("grpo", {"loss_type": "bnpo"}),
    "gspo": ("grpo", {"loss_type": "grpo", "importance_sampling_level": "sequence"}),
    "rloo": ("rloo", {}),
}


def expected_reward(run: Path, pattern: str, samples: int = 32) -> tuple[float, float]:
    """The regex reward's mean over ``samples`` fresh completions per prompt, of the base
    policy (adapter disabled) and of the trained one: far less noisy than a step's 8."""
    import re

    from tests.rl.conftest import PROMPTS
    from tunesmith.core.models import load_trained

    model, tok, _ = load_trained(run, padding_side="left")
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False) for p in PROMPTS]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)

    def mean_reward() -> float:
        torch.manual_seed(0)
        with torch.no_grad():
            out = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=2,
                                 num_return_sequences=samples, pad_token_id=tok.pad_token_id)
        comps = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return sum(bool(re.match(pattern, c.strip())) for c in comps) / len(comps)

    tuned = mean_reward()
    with model.disable_adapter():
        base = mean_reward()
    return base, tuned


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_reward_rises(variant: str, rl_model_dir: Path, rl_target: tuple[str, float], prompts_file: Path, tmp_path: Path) -> None:
    from tests.rl.conftest import rl_config
    from tunesmith.core.session import train

    objective, opts = VARIANTS[variant]
    pattern, share = rl_target
    run = tmp_path / "run"
    data = rl_config(rl_model_dir, prompts_file, run, objective, pattern, batch_size=BATCH, num_generations=4, kl_coef=0.04, **opts)
    data["training"].update(max_steps=STEPS, learning_rate=LR, save_steps=STEPS)
    result = train(tunesmith.validate_config(data))
    rows = [r for r in metrics(run) if "reward" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        assert all(isinstance(r[k], float) for k in ("reward", "kl", "policy_loss", "response_length")), r
    rewards = [r["reward"] for r in rows]
    base, tuned = expected_reward(run, pattern)
    print(variant, "logged rewards", [round(x, 3) for x in rewards], f"sampled mean reward base {base:.3f} -> tuned {tuned:.3f}")
    # a few noisy steps of 8 completions each: the check is the mean reward of many fresh samples
    assert tuned > base + 0.2 and tuned > 0.45, (base, tuned, rewards)
    assert result["reward_end"] > rewards[0]
    info = json.loads((run / "final" / "tunesmith.json").read_text())
    assert info["objective"] == objective and (run / "final" / "adapter_model.safetensors").exists()
    # the options reached TRL's trainer (its arguments are saved with the checkpoint)
    trl_args = json.loads((run / "checkpoints" / f"checkpoint-{STEPS}" / "training_args.json").read_text())
    for key, trl_key in (("loss_type", "loss_type"), ("importance_sampling_level", "importance_sampling_level"),
                         ("epsilon_high", "epsilon_high"), ("scale_rewards", "scale_rewards")):
        if key in opts:
            assert trl_args[trl_key] == opts[key], (key, trl_args.get(trl_key))
    assert trl_args["num_generations"] == 4 and trl_args["beta"] == 0.04


def test_rloo_baseline_and_options() -> None:
    from tunesmith.plugins.objectives.grpo import GRPOOptions
    from tunesmith.plugins.objectives.rloo import RLOOOptions, leave_one_out_advantages

    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5])
    adv = leave_one_out_advantages(r, 4)
    torch.testing.assert_close(adv, torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0, 0.0]))
    assert float(adv[:4].sum()) == pytest.approx(0.0, abs=1e-6)  # the baseline is unbiased within a group
    with pytest.raises(ValueError, match="epsilon_high"):
        GRPOOptions(cliprange=0.3, epsilon_high=0.2)
    with pytest.raises(ValueError):
        GRPOOptions(loss_type="ppo")
    with pytest.raises(ValueError):
        GRPOOptions(importance_sampling_level="segment")
    with pytest.raises(ValueError, match="reward_clip"):
        RLOOOptions(reward_clip=(1.0, 0.0))


def test_rloo_config_errors(rl_model_dir: Path, prompts_file: Path, tmp_path: Path) -> None:
    from tests.rl.conftest import rl_config
    from tunesmith.core.session import train

    bad = rl_config(rl_model_dir, prompts_file, tmp_path / "run", "rloo", "x", batch_size=6, num_generations=4)
    with pytest.raises(ConfigError, match="multiple of objective.num_generations"):
        train(tunesmith.validate_config(bad))
    with pytest.raises(ConfigError, match="loss_type"):
        tunesmith.validate_config(rl_config(rl_model_dir, prompts_file, tmp_path / "r", "grpo", "x", loss_type="gspo"))


def test_grpo_variants_example_validates() -> None:
    """examples/grpo_variants.yaml (GSPO as shipped) and the variants its header names validate."""
    root = Path(__file__).resolve().parents[2] / "examples" / "grpo_variants.yaml"
    cfg = tunesmith.load_config(root)
    assert cfg.objective.name == "grpo"
    section = cfg.model_dump()["objective"]
    assert section["loss_type"] == "grpo" and section["importance_sampling_level"] == "sequence", section
    for sets in (["objective.loss_type=dapo", "objective.epsilon_high=0.28", "objective.mask_truncated_completions=true"],
                 ["objective.loss_type=dr_grpo", "objective.scale_rewards=none"], ["objective.loss_type=bnpo"]):
        other = tunesmith.load_config(root, overrides=["objective.importance_sampling_level=token", *sets])
        assert other.model_dump()["objective"]["loss_type"] == sets[0].split("=")[1]
    with pytest.raises(ConfigError, match="loss_type"):
        tunesmith.load_config(root, overrides=["objective.loss_type=gspo"])
