"""Helpers for the training tests: configs on the tiny model, varied-length chat data."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ.setdefault("TUNESMITH_NO_PROGRESS", "1")

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike".split()


def varied_chat(n: int = 16) -> list[dict]:
    """Chat rows whose answers have very different lengths (1 to ~25 tokens)."""
    rows = []
    for i in range(n):
        k = 1 + (i * 7) % 13
        rows.append({"messages": [
            {"role": "user", "content": f"List {k} words starting at {WORDS[i % len(WORDS)]}."},
            {"role": "assistant", "content": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(k))},
        ]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def make_cfg(tmp_path: Path, tiny_model_dir: Path, tiny_chat_file: Path) -> Any:
    """make_cfg(peft={...}, training={...}, **top) -> validated Config in tmp_path."""
    import tunesmith

    def _make(*, name: str = "cfg", data: Path | None = None, peft: dict | None = None, training: dict | None = None, **top: Any) -> Any:
        t = {
            "max_steps": 8, "learning_rate": 1e-2, "batch_size": 4, "gradient_accumulation_steps": 1,
            "max_length": 64, "logging_steps": 1, "save_steps": 0, "eval_steps": 0, "warmup_ratio": 0.0,
            "gradient_checkpointing": False, "report_to": [], "early_stopping": None, "lr_scheduler": "constant",
        }
        t.update(training or {})
        data_cfg = {"path": str(data or tiny_chat_file)}
        data_cfg.update(top.pop("data_extra", {}))
        cfg = {
            "model": {"source": "hf", "path": str(tiny_model_dir)},
            "data": data_cfg,
            "peft": peft or {"method": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear", "dropout": 0.0},
            "training": t,
            "output_dir": str(tmp_path / f"run-{name}"),
        }
        cfg.update(top)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
        tunesmith.reset_plugins()
        return tunesmith.load_config(path)

    return _make


def losses_of(run_dir: Path) -> list[float]:
    rows = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r and "train_loss" not in r]
