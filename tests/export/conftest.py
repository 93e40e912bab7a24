"""Finished runs made with plain peft on the tiny model (as training writes them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest


def make_run(root: Path, base_dir: Path, peft_config: Any = None, *, method: str = "lora", seed: int = 0,
             quantization: dict | None = None, options: dict | None = None) -> Path:
    """A run directory whose final/ holds a PEFT adapter with non-trivial weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = peft_config or LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                    init_lora_weights=False, lora_dropout=0.0)
    model = get_peft_model(base, cfg)
    with torch.no_grad():  # make the adapter clearly change the outputs
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    final = root / "final"
    model.save_pretrained(final, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(final)
    info = {"base_model_dir": str(base_dir), "peft": {"method": method, "options": options or {}}, "objective": "sft"}
    if quantization:
        info["quantization"] = quantization
    (final / "tunesmith.json").write_text(json.dumps(info), encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    return make_run(tmp_path_factory.mktemp("run") / "lora-run", tiny_model_dir)


def adapter_logits(run: Path, base_dir: Path, texts=None, quantization: Any = None):
    """Reference: plain transformers + plain peft, nothing from tunesmith."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"quantization_config": quantization} if quantization is not None else {}
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, **kw)
    model = PeftModel.from_pretrained(base, run / "final").eval()
    return plain_logits(model, AutoTokenizer.from_pretrained(base_dir), texts)


TEXTS = ["Hello there, how are you today?", "<|im_start|>user\nWhat is 4 plus 1?<|im_end|>\n<|im_start|>assistant\n"]


def plain_logits(model, tok, texts=None):
    import torch

    with torch.no_grad():
        return torch.cat([model(**tok(t, return_tensors="pt")).logits[0] for t in (texts or TEXTS)])
