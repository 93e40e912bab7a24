"""Shared pieces of the objective tests: a preference set with a learnable signal
(a short correct sum is preferred over a chatty wrong one), run configs on the tiny
model, and the preference accuracy of a finished run on held-out pairs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("TUNESMITH_NO_PROGRESS", "1")


def _pair(a: int, b: int) -> dict:
    return {
        "prompt": [{"role": "user", "content": f"What is {a} plus {b}?"}],
        "chosen": [{"role": "assistant", "content": f"{a + b}."}],
        "rejected": [{"role": "assistant", "content": f"Hmm, I think it is {a * b + 7}, maybe, not sure."}],
    }


TRAIN_PAIRS = [_pair(a, b) for a in range(1, 5) for b in range(1, 4)]  # 12 pairs
HELD_OUT_PAIRS = [_pair(a, b) for a in range(6, 9) for b in range(5, 7)]  # 6 pairs never trained on


@pytest.fixture(autouse=True)
def _one_thread():
    """Two cores shared by many processes: one thread is faster and steadier here."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run_config(model_dir: Path, data: Path, out: Path, objective: Any, *, losses: list | None = None, **training: Any) -> dict:
    t = {"max_steps": 12, "learning_rate": 5e-3, "batch_size": 4, "gradient_accumulation_steps": 1, "max_length": 64,
         "logging_steps": 1, "save_steps": 0, "eval_steps": 0, "warmup_ratio": 0.0, "gradient_checkpointing": False,
         "report_to": [], "early_stopping": None, "lr_scheduler": "constant", "precision": "fp32"}
    t.update(training)
    cfg: dict = {
        "model": {"source": "hf", "path": str(model_dir)},
        "data": {"path": str(data)},
        "objective": objective,
        "peft": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "training": t,
        "output_dir": str(out),
    }
    if losses is not None:
        cfg["losses"] = losses
    return cfg


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]


def preference_accuracy(run: Path, pairs: list[dict], *, implicit_reward: bool) -> dict:
    """How often a finished run scores the chosen reply of ``pairs`` above the rejected
    one: ``{"accuracy", "margin", "base_accuracy", "base_margin"}``. ``implicit_reward``:
    the score is ``log pi - log ref`` (summed; KTO/DPO, ref = the adapter disabled, so
    the base scores every pair 0), else the mean token log-prob (ORPO's reward)."""
    import torch

    from tunesmith.core.models import load_trained
    from tunesmith.core.preference import PairCollator, tokenize_pairs
    from tunesmith.plugins.losses.dpo import sequence_logps

    model, tok, _info = load_trained(run)
    batch = PairCollator(tok.pad_token_id)(tokenize_pairs(tok, pairs, max_length=64))
    args = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    with torch.no_grad():
        logps, lengths = sequence_logps(model, *args)
        with model.disable_adapter():
            ref, _ = sequence_logps(model, *args)
    tuned, base = (logps - ref, torch.zeros_like(ref)) if implicit_reward else (logps / lengths, ref / lengths)
    n = len(pairs)
    out = {}
    for key, score in (("", tuned), ("base_", base)):
        diff = score[:n] - score[n:]
        out[key + "accuracy"] = float((diff > 0).float().mean())
        out[key + "margin"] = float(diff.mean())
    return out


# --------------------------------------------------------------------------- RL (the tiny policy of tests/rl)
@pytest.fixture(scope="session")
def rl_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    from tests.rl.conftest import build_rl_tiny_model

    return build_rl_tiny_model(tmp_path_factory.mktemp("rl-tiny") / "model", tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def rl_target(rl_model_dir: Path) -> tuple[str, float]:
    from tests.rl.conftest import PROMPTS, first_token_pattern

    return first_token_pattern(rl_model_dir, PROMPTS)


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    from tests.rl.conftest import PROMPTS

    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
