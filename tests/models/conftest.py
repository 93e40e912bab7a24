"""Fixtures of the architecture and chat-template tests: tiny models per architecture,
configs that train them for a few steps, and a plugin that keeps the trained model's
logits (to compare with what reloads from disk)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ.setdefault("TUNESMITH_NO_PROGRESS", "1")

#: a prompt in ChatML (the SmolLM2 tokenizer's own template) and plain text
PROBE = "<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n<|im_start|>assistant\n5.<|im_end|> The capital of France is"


class KeepLogits:
    """A lifecycle plugin: after training, the trained model's logits on PROBE."""

    def __init__(self) -> None:
        self.logits: Any = None

    def after_train(self, run: Any, result: dict) -> None:
        import torch

        model, tok = run.model, run.tokenizer
        model.eval()
        ids = tok(PROBE, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            self.logits = model(input_ids=ids.to(next(model.parameters()).device)).logits[0].float().cpu()


def probe_logits(model: Any, tok: Any) -> Any:
    import torch

    ids = tok(PROBE, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits[0].float().cpu()


@pytest.fixture(scope="session")
def arch_dirs(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """arch_dirs(arch, chat_template=True) -> folder of a tiny model (built once per session)."""
    from tests.models.archs import build

    root = tmp_path_factory.mktemp("archs")
    cache: dict[tuple[str, bool], Path] = {}

    def _get(arch: str, chat_template: bool = True) -> Path:
        key = (arch, chat_template)
        if key not in cache:
            cache[key] = build(arch, root / f"{arch}-{int(chat_template)}", chat_template=chat_template)
        return cache[key]

    return _get


@pytest.fixture
def arch_cfg(tmp_path: Path, tiny_chat_file: Path) -> Any:
    """arch_cfg(model_dir, name=..., peft=..., training=..., **top) -> a validated Config."""
    import tunesmith

    def _make(model_dir: Path, *, name: str = "run", peft: dict | None = None, training: dict | None = None,
              data: Path | None = None, **top: Any) -> Any:
        t = {
            "max_steps": 3, "learning_rate": 2e-2, "batch_size": 4, "gradient_accumulation_steps": 1,
            "max_length": 64, "logging_steps": 1, "save_steps": 0, "eval_steps": 0, "warmup_ratio": 0.0,
            "gradient_checkpointing": False, "report_to": [], "early_stopping": None, "lr_scheduler": "constant",
            "precision": "fp32",
        }
        t.update(training or {})
        cfg = {
            "model": {"source": "hf", "path": str(model_dir)},
            "data": {"path": str(data or tiny_chat_file)},
            "peft": peft or {"method": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear", "dropout": 0.0},
            "training": t,
            "evaluation": [],
            "export": [],
            "output_dir": str(tmp_path / f"run-{name}"),
        }
        cfg.update(top)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
        tunesmith.reset_plugins()
        return tunesmith.load_config(path)

    return _make


@pytest.fixture
def keep_logits(tunesmith_plugin: Any) -> KeepLogits:
    from tunesmith import hookimpl

    keeper = KeepLogits()

    class _Plugin:
        @hookimpl
        def after_train(self, run: Any, result: dict) -> None:
            keeper.after_train(run, result)

    tunesmith_plugin(_Plugin(), "test.keep_logits")
    return keeper
