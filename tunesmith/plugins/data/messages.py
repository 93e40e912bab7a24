"""OpenAI chat messages: ``{"messages": [{"role", "content"}, ...]}`` (multi-turn)."""

from __future__ import annotations

from tunesmith import hookimpl
from tunesmith.core.data import check_messages, clean_messages
from tunesmith.plugins.data._base import ChatRendering


class Messages(ChatRendering):
    name = "messages"
    description = "OpenAI chat rows: messages with roles system/user/assistant(/tool), multi-turn."
    kind = "chat"
    fields = ("messages",)
    fields_hint = "messages[{role, content}]"

    def detect(self, row: dict) -> bool:
        return isinstance(row.get("messages"), list) and "chosen" not in row

    def validate(self, row: dict) -> list[str]:
        if "messages" not in row:
            return ["missing field 'messages'"]
        problems = check_messages(row["messages"], "messages")
        if not problems and not any(m["role"] == "assistant" for m in row["messages"]):
            problems.append("'messages' has no assistant turn to learn from")
        return problems

    def to_canonical(self, row: dict) -> dict:
        return {"messages": clean_messages(row["messages"])}

    def from_canonical(self, record: dict) -> dict:
        return {"messages": clean_messages(record["messages"])}


@hookimpl
def register_data_formats(register):
    register(Messages())
