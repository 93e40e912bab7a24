"""Distillation: the divergences against TRL's GKD implementation, the shared-tokenizer
check, and a tiny student whose KL to a tuned teacher (a finished tunesmith run) falls."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

import tunesmith  # noqa: E402
from tunesmith.core.errors import ConfigError  # noqa: E402
from tunesmith.plugins.objectives.distill import DistillOptions, generalized_jsd  # noqa: E402

from .conftest import metrics, run_config  # noqa: E402


@pytest.mark.parametrize(("beta", "temperature"), [(0.0, 1.0), (1.0, 1.0), (0.5, 1.0), (0.1, 2.0), (0.9, 0.7)])
def test_divergence_matches_trl_gkd(beta: float, temperature: float) -> None:
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    g = torch.Generator().manual_seed(int(beta * 10 + temperature * 100))
    s = torch.randn(3, 5, 50, generator=g) * 2
    t = torch.randn(3, 5, 50, generator=g) * 2
    labels = torch.randint(0, 50, (3, 5), generator=g)
    labels[0, :2] = -100
    ref = GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=beta, temperature=temperature, reduction="batchmean")
    keep = labels != -100
    ours = generalized_jsd(s[keep], t[keep], beta=beta, temperature=temperature).mean()
    assert float(ours) == pytest.approx(float(ref), abs=1e-5)
    if 0 < beta < 1:  # the JSD is bounded by log 2 and symmetric when beta = 0.5
        assert float(ours) <= 0.6932
    other = generalized_jsd(s[keep], t[keep], beta=beta, temperature=temperature * 1.5).mean()
    assert abs(float(other) - float(ref)) > 1e-4
    assert float(generalized_jsd(s[keep], s[keep], beta=beta, temperature=temperature).abs().max()) < 1e-5


def test_options() -> None:
    assert DistillOptions(teacher="runs/x").beta_value() == 0.0
    assert DistillOptions(teacher="runs/x", divergence="reverse_kl").beta_value() == 1.0
    assert DistillOptions(teacher="runs/x", divergence="jsd", beta=0.3).beta_value() == 0.3
    with pytest.raises(ValueError, match="needs 'source'"):
        DistillOptions(teacher={"path": "x"})
    with pytest.raises(ValueError):
        DistillOptions(teacher="x", on_policy=1.5)


@pytest.fixture(scope="module")
def teacher_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tuned teacher: the tiny model after a short SFT run on the chat set (a finished tunesmith run)."""
    from tunesmith.core.session import train
    from tunesmith.testing import TINY_CHAT

    tmp = tmp_path_factory.mktemp("teacher")
    data = tmp / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in TINY_CHAT), encoding="utf-8")
    cfg = run_config(tiny_model_dir, data, tmp / "run", "sft", max_steps=16, learning_rate=1e-2)
    train(tunesmith.validate_config(cfg))
    return tmp / "run"


def test_student_kl_to_the_teacher_falls(tiny_model_dir: Path, teacher_run: Path, tmp_path: Path) -> None:
    from tunesmith.core.session import train
    from tunesmith.testing import TINY_CHAT

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in TINY_CHAT), encoding="utf-8")
    run = tmp_path / "student"
    cfg = run_config(tiny_model_dir, data, run, {"name": "distill", "teacher": str(teacher_run)}, max_steps=12,
                     learning_rate=1e-2, save_steps=6)
    result = train(tunesmith.validate_config(cfg))
    rows = [r for r in metrics(run) if "distill/kl" in r]
    kls = [r["distill/kl"] for r in rows]
    print("distill kl per step", [round(k, 4) for k in kls])
    assert len(kls) == 12 and kls[0] > 0
    assert sum(kls[-3:]) / 3 < 0.6 * sum(kls[:3]) / 3, kls  # the student moved towards the teacher
    assert result["kl_last"] < result["kl_first"] and result["teacher"].startswith("tunesmith run")
    info = json.loads((run / "final" / "tunesmith.json").read_text())
    assert info["objective"] == "distill" and (run / "final" / "adapter_model.safetensors").exists()
    assert (run / "checkpoints" / "checkpoint-6" / "COMPLETE").exists()


def test_on_policy_jsd_with_an_sft_term(tiny_model_dir: Path, teacher_run: Path, tmp_path: Path) -> None:
    from tunesmith.core.session import train
    from tunesmith.testing import TINY_CHAT

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in TINY_CHAT), encoding="utf-8")
    objective = {"name": "distill", "teacher": str(teacher_run / "final"), "divergence": "jsd", "beta": 0.5,
                 "on_policy": 0.5, "max_new_tokens": 6}
    cfg = run_config(tiny_model_dir, data, tmp_path / "run", objective, max_steps=4, learning_rate=1e-2,
                     losses=[{"name": "distill"}, {"name": "causal_lm", "weight": 0.5}])
    result = train(tunesmith.validate_config(cfg))
    rows = metrics(tmp_path / "run")
    on = [r["distill/on_policy"] for r in rows if "distill/on_policy" in r]
    assert len(on) == 4 and 0 < sum(on) < 4, on  # some steps on the student's samples, some on the data
    assert all("loss/causal_lm" in r for r in rows if "distill/on_policy" in r)
    assert all(0 <= r["distill/divergence"] <= 0.6932 for r in rows if "distill/divergence" in r)
    assert result["steps"] == 4


def test_tokenizers_must_match(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.core.session import train
    from tunesmith.testing import TINY_CHAT

    other = tmp_path / "other-teacher"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_tokens(["<|teacher_only|>"])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(other)
    tok.save_pretrained(other)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in TINY_CHAT[:4]), encoding="utf-8")
    cfg = run_config(tiny_model_dir, data, tmp_path / "run", {"name": "distill", "teacher": {"source": "hf", "path": str(other)}},
                     max_steps=1)
    with pytest.raises(ConfigError, match=r"do not share a tokenizer: .*only the teacher has '<\|teacher_only\|>'") as exc:
        train(tunesmith.validate_config(cfg))
    assert exc.value.key == "objective.teacher"
    missing = run_config(tiny_model_dir, data, tmp_path / "run2", {"name": "distill", "teacher": str(tmp_path / "nope")}, max_steps=1)
    with pytest.raises(ConfigError, match="neither a finished tunesmith run"):
        train(tunesmith.validate_config(missing))
    no_loss = run_config(tiny_model_dir, data, tmp_path / "run3", {"name": "distill", "teacher": str(other)},
                         losses=[{"name": "causal_lm"}])
    with pytest.raises(ConfigError, match="add {name: distill}"):
        train(tunesmith.validate_config(no_loss))
