"""Alpaca: ``{"instruction", "input", "output", "system"?}`` rows (one turn)."""

from __future__ import annotations

from tunesmith import hookimpl
from tunesmith.core.data import check_str
from tunesmith.core.errors import DataError
from tunesmith.plugins.data._base import ChatRendering


class Alpaca(ChatRendering):
    name = "alpaca"
    description = "Alpaca rows: instruction, optional input, output, optional system."
    kind = "chat"
    fields = ("instruction", "input", "output", "system")
    fields_hint = "instruction, output[, input, system]"

    def detect(self, row: dict) -> bool:
        return "instruction" in row and "output" in row

    def validate(self, row: dict) -> list[str]:
        problems = check_str(row, "instruction") + check_str(row, "output")
        problems += check_str(row, "input", required=False) + check_str(row, "system", required=False)
        return problems

    def to_canonical(self, row: dict) -> dict:
        msgs = []
        if row.get("system"):
            msgs.append({"role": "system", "content": row["system"]})
        user = row["instruction"]
        if row.get("input"):
            # the input follows the instruction after a blank line (the guide's chat form)
            user = f"{user}\n\n{row['input']}" if user else row["input"]
        msgs.append({"role": "user", "content": user})
        msgs.append({"role": "assistant", "content": row["output"]})
        return {"messages": msgs}

    def from_canonical(self, record: dict) -> dict:
        msgs = record["messages"]
        system = None
        if msgs and msgs[0]["role"] == "system":
            system, msgs = msgs[0]["content"], msgs[1:]
        roles = [m["role"] for m in msgs]
        if roles != ["user", "assistant"]:
            raise DataError(
                f"alpaca holds one user turn and one assistant turn (plus a system prompt); this record has {' / '.join(roles) or 'no turns'}"
            )
        row = {"instruction": msgs[0]["content"], "input": "", "output": msgs[1]["content"]}
        if system is not None:
            row["system"] = system
        return row


@hookimpl
def register_data_formats(register):
    register(Alpaca())
