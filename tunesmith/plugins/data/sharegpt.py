"""ShareGPT: ``{"conversations": [{"from": "human|gpt|system", "value"}], "system"?}``."""

from __future__ import annotations

from tunesmith import hookimpl
from tunesmith.core.data import check_str
from tunesmith.plugins.data._base import ChatRendering

#: ``from`` values seen in the wild -> canonical roles
ROLE_OF = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant", "chatgpt": "assistant", "bard": "assistant",
    "system": "system",
    "tool": "tool", "function": "tool", "observation": "tool", "function_response": "tool",
}
FROM_OF = {"user": "human", "assistant": "gpt", "system": "system", "tool": "tool"}


class ShareGPT(ChatRendering):
    name = "sharegpt"
    description = "ShareGPT rows: conversations of {from: human|gpt|system, value}, optional system."
    kind = "chat"
    fields = ("conversations", "system")
    fields_hint = "conversations[{from, value}][, system]"

    def detect(self, row: dict) -> bool:
        return isinstance(row.get("conversations"), list)

    def validate(self, row: dict) -> list[str]:
        conv = row.get("conversations")
        if conv is None:
            return ["missing field 'conversations'"]
        if not isinstance(conv, list):
            return [f"'conversations' must be a list, got {type(conv).__name__}"]
        if not conv:
            return ["'conversations' is an empty list"]
        problems = check_str(row, "system", required=False)
        for i, turn in enumerate(conv):
            if not isinstance(turn, dict):
                problems.append(f"'conversations[{i}]' must be an object with from and value")
                continue
            if turn.get("from") not in ROLE_OF:
                problems.append(f"'conversations[{i}].from' must be one of human, gpt, system, tool; got {turn.get('from')!r}")
            if not isinstance(turn.get("value"), str):
                problems.append(f"'conversations[{i}].value' must be a string")
        if not problems and not any(ROLE_OF[t["from"]] == "assistant" for t in conv):
            problems.append("'conversations' has no gpt turn to learn from")
        return problems

    def to_canonical(self, row: dict) -> dict:
        msgs = []
        if row.get("system"):
            msgs.append({"role": "system", "content": row["system"]})
        msgs += [{"role": ROLE_OF[t["from"]], "content": t["value"]} for t in row["conversations"]]
        return {"messages": msgs}

    def from_canonical(self, record: dict) -> dict:
        msgs = record["messages"]
        row: dict = {}
        if msgs and msgs[0]["role"] == "system":
            row["system"] = msgs[0]["content"]
            msgs = msgs[1:]
        row["conversations"] = [{"from": FROM_OF[m["role"]], "value": m["content"]} for m in msgs]
        return row


@hookimpl
def register_data_formats(register):
    register(ShareGPT())
