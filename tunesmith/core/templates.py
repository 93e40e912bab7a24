"""Chat templates: which one a run uses, and making the tokenizer and model fit it.

``apply_chat_template(cfg, tokenizer, model, registries)`` is called by the
training session right after the base model loads and before the PEFT method is
applied. It returns what the run records about the choice (``{}``: the
tokenizer's own template is used unchanged).
"""

from __future__ import annotations

from typing import Any


def apply_chat_template(cfg: Any, tokenizer: Any, model: Any, registries: Any) -> dict:
    """Choose the run's chat template and make tokenizer and model fit it."""
    return {}
