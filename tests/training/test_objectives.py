"""The objectives contract: objective: is validated against the registry, the old
rl: section is refused with its new place, and every built-in objective runs in
the one training session (run_dir honoured, one result, one final artefact)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import tunesmith
from tunesmith.core.errors import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from objective_fingerprint import CHAT, PAIRS, PROMPTS, TEXT, objective_config  # noqa: E402


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def test_unknown_objective_is_a_one_line_error_with_file_line_and_suggestion(tmp_path: Path) -> None:
    p = write(tmp_path, "output_dir: runs/x\nobjective: nosuch\n")
    with pytest.raises(ConfigError) as err:
        tunesmith.load_config(p)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"{p}:2" in msg and "objective.name" in msg and "unknown objective 'nosuch'" in msg
    for name in ("sft", "cpt", "dpo", "reward", "grpo", "ppo"):
        assert name in msg  # the installed list
    with pytest.raises(ConfigError, match=r"did you mean 'sft'"):
        tunesmith.load_config(write(tmp_path, "objective: sfft\n"))


def test_objective_options_are_validated_by_the_objective(tmp_path: Path) -> None:
    p = write(tmp_path, "objective:\n  name: grpo\n  num_generatons: 4\n")
    with pytest.raises(ConfigError) as err:
        tunesmith.load_config(p)
    assert f"{p}:3" in str(err.value) and "did you mean 'num_generations'" in str(err.value)
    with pytest.raises(ConfigError, match="takes no options"):
        tunesmith.load_config(write(tmp_path, "objective: {name: sft, beta: 0.1}\n"))
    cfg = tunesmith.load_config(write(tmp_path, "objective: {name: grpo, rewards: [{name: regex, pattern: x}]}\n"))
    assert cfg.objective.options.num_generations == 4  # the objective's own default
    assert cfg.objective.options.rewards[0].options.pattern == "x"  # nested plugin sections validated too
    assert cfg.to_dict()["objective"]["rewards"][0]["mode"]  # and resolved with their defaults


def test_the_old_rl_section_names_its_new_place(tmp_path: Path) -> None:
    p = write(tmp_path, "objective: grpo\nrl:\n  num_generations: 4\n")
    with pytest.raises(ConfigError) as err:
        tunesmith.load_config(p)
    assert f"{p}:2" in str(err.value) and "objective: {name: grpo" in str(err.value)


def test_an_unknown_reward_inside_the_objective_names_its_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        tunesmith.load_config(write(tmp_path, "objective:\n  name: ppo\n  rewards:\n    - {name: regexx}\n"))
    assert "objective.rewards.0.name" in str(err.value) and "did you mean 'regex'" in str(err.value)


def test_objectives_listed_with_their_distribution() -> None:
    regs = tunesmith.registry()
    for name in ("sft", "cpt", "dpo", "reward", "grpo", "ppo"):
        entry = regs.objectives.entry(name)
        assert entry.plugin.name == f"objective.{name}" and entry.plugin.distribution == "tunesmith"


DATA = {"sft": CHAT, "cpt": TEXT, "dpo": PAIRS, "reward": PAIRS, "grpo": PROMPTS, "ppo": PROMPTS}


@pytest.mark.parametrize("objective", sorted(DATA))
def test_every_objective_honours_run_dir(objective: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in DATA[objective]), encoding="utf-8")
    configured = tmp_path / "configured-output"
    cfg = objective_config(objective, tiny_model_dir, data, configured)
    cfg["training"]["max_steps"] = 2
    run = tmp_path / "elsewhere"
    result = tunesmith.train(tunesmith.validate_config(cfg), run_dir=run)
    assert not configured.exists()
    assert result["run_dir"] == str(run) and result["objective"] == objective and result["steps"] == 2
    assert json.loads((run / "train_result.json").read_text())["objective"] == objective
    info = json.loads((run / "final" / "tunesmith.json").read_text())
    assert info["objective"] == objective and info["steps"] == 2
    assert (run / "final" / "adapter_model.safetensors").exists()
    assert (run / "config.yaml").exists() and (run / "metrics.jsonl").exists()
