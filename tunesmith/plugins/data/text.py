"""Raw text for continued pre-training: ``{"text": str}`` rows or plain .txt files."""

from __future__ import annotations

from typing import Any

from tunesmith import hookimpl
from tunesmith.core.data import check_str


class Text:
    name = "text"
    description = "Raw text (a `text` field or .txt files) for continued pre-training."
    kind = "text"
    fields = ("text",)
    fields_hint = "text"

    def detect(self, row: dict) -> bool:
        return isinstance(row.get("text"), str) and not any(
            k in row for k in ("messages", "conversations", "instruction", "chosen")
        )

    def validate(self, row: dict) -> list[str]:
        return check_str(row, "text")

    def to_canonical(self, row: dict) -> dict:
        return {"text": row["text"]}

    def from_canonical(self, record: dict) -> dict:
        return {"text": record["text"]}

    def render(self, record: dict, tokenizer: Any, *, max_length: int, **_: Any) -> dict:
        from tunesmith.core.render import render_text

        return render_text(tokenizer, record["text"], max_length=max_length)


@hookimpl
def register_data_formats(register):
    register(Text())
