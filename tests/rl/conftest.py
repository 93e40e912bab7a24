"""Fixtures for the RL tests: a tiny policy whose first token is learnable, and prompts."""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path

import pytest

PROMPTS = [f"Say something about topic {i}." for i in range(8)]


def build_rl_tiny_model(out: Path, tok_dir: Path, *, seed: int = 0) -> Path:
    """A tiny Llama (2 layers, hidden 64) with a wide weight init, so that its next-token
    distribution is peaked (a default 0.02 init gives a uniform one over 49k tokens,
    where no sampled completion ever hits a chosen token and no reward varies)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tok_dir)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, initializer_range=0.5,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def first_token_pattern(model_dir: Path, prompts: list[str], *, share: float = 0.15, samples: int = 32, seed: int = 1) -> tuple[str, float]:
    """A regex matching the base model's most frequent first words, covering ~``share``
    of its sampled first tokens: a reward with a known optimum (1.0) and a base rate
    low enough to rise from."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.core.models import setup_tokenizer

    tok = setup_tokenizer(AutoTokenizer.from_pretrained(model_dir), padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    counts: collections.Counter = collections.Counter()
    torch.manual_seed(seed)
    for p in prompts:
        text = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, do_sample=True, top_k=None, top_p=1.0, max_new_tokens=1, num_return_sequences=samples,
                                 pad_token_id=tok.pad_token_id)
        counts.update(tok.decode(t).strip() for t in out[:, -1])
    total = sum(counts.values())
    chosen, covered = [], 0
    for word, n in counts.most_common():
        if not re.fullmatch(r"[A-Za-z]{3,}", word):
            continue
        chosen.append(word)
        covered += n
        if covered / total >= share:
            break
    return "^(?:" + "|".join(re.escape(w) for w in chosen) + r")\b", covered / total


@pytest.fixture(scope="session")
def rl_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    return build_rl_tiny_model(tmp_path_factory.mktemp("rl-tiny") / "model", tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def rl_target(rl_model_dir: Path) -> tuple[str, float]:
    return first_token_pattern(rl_model_dir, PROMPTS)


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS), encoding="utf-8")
    return path


def rl_config(model_dir: Path, prompts: Path, out: Path, objective: str, pattern: str, **rl: object) -> dict:
    return {
        "model": {"source": "hf", "path": str(model_dir)},
        "data": {"path": str(prompts)},
        "peft": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "training": {"max_steps": 12, "learning_rate": 2e-2, "gradient_checkpointing": False, "save_steps": 0,
                     "warmup_ratio": 0.0, "lr_scheduler": "constant", "report_to": [], "precision": "fp32"},
        "objective": {"name": objective, "rewards": [{"name": "regex", "pattern": pattern, "mode": "match"}],
                      "max_new_tokens": 2, "temperature": 1.0, **rl},
        "output_dir": str(out),
    }
