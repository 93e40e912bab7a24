"""Shared pieces of the built-in data formats (not a plugin itself)."""

from __future__ import annotations

from typing import Any


class ChatRendering:
    """``render``: a canonical record as model inputs, via the tokenizer's own chat template.

    Labels are masked on everything but the assistant turns when ``completion_only``;
    ``truncated`` in the result reports a cut, nothing is cut silently.
    """

    kind = "chat"

    def render(self, record: dict, tokenizer: Any, *, max_length: int, completion_only: bool = True) -> dict:
        from tunesmith.core.render import render_chat

        return render_chat(tokenizer, record["messages"], max_length=max_length, completion_only=completion_only)
