"""A learned reward: a sequence-classification model scores prompt + completion.

``path`` is any folder ``AutoModelForSequenceClassification`` loads (config.json +
safetensors, one output), or the run directory / ``final/`` folder of a tunesmith
``objective: reward`` run (a full model, or a PEFT adapter over the base model named
in ``tunesmith.json``). The conversation is rendered with the reward model's own
chat template when it has one, else as prompt text followed by the completion.
The model is loaded once per process and cached by path.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tunesmith import hookimpl

_CACHE: dict[str, tuple[Any, Any]] = {}
_LOCK = threading.Lock()


class RewardModelOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(..., description="Sequence-classification model folder, or a tunesmith reward run (its run dir or final/).")
    batch_size: int = Field(8, ge=1, description="Completions scored per forward pass.")
    max_length: int = Field(1024, ge=8, description="Longest prompt + completion in tokens (longer ones are truncated from the left).")
    scale: float = Field(1.0, description="Multiply the raw score by this.")
    shift: float = Field(0.0, description="Add this to the scaled score (e.g. minus the reward model's mean).")


def _resolve(path: str, context: Any) -> Path:
    p = Path(path).expanduser()
    if not p.is_absolute():
        cfg = getattr(context, "config", None)
        p = cfg.resolve_path(p) if cfg is not None and hasattr(cfg, "resolve_path") else p.resolve()
    if (p / "final").is_dir() and not (p / "config.json").exists() and not (p / "adapter_config.json").exists():
        p = p / "final"
    return p


def load_reward_model(path: str | Path) -> tuple[Any, Any]:
    """(model, tokenizer) of a sequence-classification folder or tunesmith reward run, cached."""
    from tunesmith.core.errors import TunesmithError

    p = Path(path)
    key = str(p.resolve())
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not p.is_dir():
            raise TunesmithError(f"reward model folder not found: {p}")
        base: str | None = None
        if (p / "adapter_config.json").exists():
            info_path = p / "tunesmith.json"
            if info_path.exists():
                base = json.loads(info_path.read_text(encoding="utf-8")).get("base_model_dir")
            if not base:
                base = json.loads((p / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
            if not base or not (Path(base) / "config.json").exists():
                raise TunesmithError(f"reward model adapter in {p}: its base model folder ({base}) is not available")
            from peft import PeftModel

            model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, trust_remote_code=False)
            model = PeftModel.from_pretrained(model, str(p))
        elif (p / "config.json").exists():
            model = AutoModelForSequenceClassification.from_pretrained(str(p), trust_remote_code=False)
        else:
            raise TunesmithError(f"{p} holds neither a model (config.json) nor an adapter (adapter_config.json)")
        tok = AutoTokenizer.from_pretrained(str(p) if (p / "tokenizer_config.json").exists() else base, trust_remote_code=False)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        cfg = getattr(model, "config", None)
        if cfg is not None and getattr(cfg, "pad_token_id", None) is None:
            cfg.pad_token_id = tok.pad_token_id
        model.eval()
        _CACHE[key] = (model, tok)
        return model, tok


def render_for_reward(tokenizer: Any, prompt_messages: list[dict] | None, prompt_text: str, completion: str) -> str:
    if prompt_messages and getattr(tokenizer, "chat_template", None):
        msgs = list(prompt_messages) + [{"role": "assistant", "content": completion}]
        return tokenizer.apply_chat_template(msgs, tokenize=False)
    return prompt_text + completion


class RewardModelReward:
    name = "reward_model"
    description = "Score of a sequence-classification reward model (a folder or a tunesmith reward run) on prompt + completion"
    Options = RewardModelOptions

    def score(self, prompts: list[str], completions: list[str], rows: list[dict], options: RewardModelOptions, context: Any) -> list[float]:
        import torch

        model, tok = load_reward_model(_resolve(options.path, context))
        texts = [
            render_for_reward(tok, (row or {}).get("prompt"), p, c) for p, c, row in zip(prompts, completions, rows)
        ]
        out: list[float] = []
        old_side = tok.truncation_side
        tok.truncation_side = "left"  # keep the completion when the prompt is long
        try:
            for i in range(0, len(texts), options.batch_size):
                enc = tok(
                    texts[i : i + options.batch_size],
                    return_tensors="pt",
                    padding=True,
                    truncation=True,
                    max_length=options.max_length,
                    add_special_tokens=False,
                )
                with torch.inference_mode():
                    logits = model(**enc).logits
                out.extend((logits[:, 0].float() * options.scale + options.shift).tolist())
        finally:
            tok.truncation_side = old_side
        return out


@hookimpl
def register_reward_functions(register: Any) -> None:
    register(RewardModelReward())
