"""Preference pairs: ``{"prompt", "chosen", "rejected"}`` as strings or message lists.

Rows without ``prompt`` whose ``chosen``/``rejected`` are whole conversations (TRL's
implicit-prompt form) get the shared leading turns as the prompt.
"""

from __future__ import annotations

from typing import Any

from tunesmith import hookimpl
from tunesmith.core.data import check_messages, check_str, clean_messages
from tunesmith.core.errors import DataError


def _as_messages(value: Any, role: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return clean_messages(value)


class Preference:
    name = "preference"
    description = "Preference pairs: prompt, chosen, rejected (strings or message lists), optional system."
    kind = "pairs"
    fields = ("prompt", "chosen", "rejected", "system")
    fields_hint = "prompt, chosen, rejected[, system]"

    def detect(self, row: dict) -> bool:
        return "chosen" in row and "rejected" in row

    def validate(self, row: dict) -> list[str]:
        problems = []
        for f in ("chosen", "rejected"):
            if f not in row:
                problems.append(f"missing field '{f}'")
            elif not isinstance(row[f], str):
                problems += check_messages(row[f], f)
        if "prompt" in row:
            if not isinstance(row["prompt"], str):
                problems += check_messages(row["prompt"], "prompt")
        elif not problems and (isinstance(row["chosen"], str) or isinstance(row["rejected"], str)):
            problems.append("missing field 'prompt' (needed when chosen/rejected are strings)")
        elif not problems and not _shared_prefix(row["chosen"], row["rejected"]):
            problems.append("missing field 'prompt' and chosen/rejected share no leading turns")
        problems += check_str(row, "system", required=False)
        return problems

    def to_canonical(self, row: dict) -> dict:
        if "prompt" in row:
            prompt = _as_messages(row["prompt"], "user")
            chosen = _as_messages(row["chosen"], "assistant")
            rejected = _as_messages(row["rejected"], "assistant")
        else:
            n = _shared_prefix(row["chosen"], row["rejected"])
            prompt = clean_messages(row["chosen"][:n])
            chosen, rejected = clean_messages(row["chosen"][n:]), clean_messages(row["rejected"][n:])
        if row.get("system") and not (prompt and prompt[0]["role"] == "system"):
            prompt = [{"role": "system", "content": row["system"]}] + prompt
        if not chosen or not rejected:
            raise DataError("chosen and rejected must each hold at least one turn after the prompt")
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}

    def from_canonical(self, record: dict) -> dict:
        prompt, chosen, rejected = record["prompt"], record["chosen"], record["rejected"]
        simple = (
            len(prompt) == 1 and prompt[0]["role"] == "user"
            and len(chosen) == 1 and chosen[0]["role"] == "assistant"
            and len(rejected) == 1 and rejected[0]["role"] == "assistant"
        )
        if simple:
            return {"prompt": prompt[0]["content"], "chosen": chosen[0]["content"], "rejected": rejected[0]["content"]}
        return {"prompt": clean_messages(prompt), "chosen": clean_messages(chosen), "rejected": clean_messages(rejected)}

    def render(self, record: dict, tokenizer: Any, *, max_length: int, completion_only: bool = True) -> dict:
        """Both answers rendered after the prompt: ``{"chosen": {...}, "rejected": {...}}``."""
        from tunesmith.core.render import render_chat

        return {
            side: render_chat(tokenizer, record["prompt"] + record[side], max_length=max_length, completion_only=completion_only)
            for side in ("chosen", "rejected")
        }


def _shared_prefix(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return min(n, len(a) - 1, len(b) - 1) if n else 0


@hookimpl
def register_data_formats(register):
    register(Preference())
