"""Unpaired feedback (KTO): ``{"prompt", "completion", "label": true|false}``.

``prompt`` is text (one user turn) or a list of messages, ``completion`` text (one
assistant turn) or a list of assistant messages; ``label`` says whether the
completion is desirable (``true``) or undesirable (``false``). CSV cells such as
``"true"``/``"0"`` are read as booleans. This is TRL's unpaired preference format.

Canonical record: a chat record whose trailing assistant turns are the completion
and whose ``metadata.label`` is the feedback::

    {"messages": [...prompt, ...completion], "metadata": {"label": true, ...}}

It is a ``chat`` record on purpose: core's canonical kinds are chat, pairs and text
(``tunesmith.core.data.record_kind``), and cleaners, reports, splits and mixing
only know those, so an unpaired row goes through every data stage as a chat
record and keeps its label in ``metadata`` (which every stage preserves).

:func:`unpair_records` turns preference pairs into unpaired rows (chosen -> true,
rejected -> false), as TRL's ``unpair_preference_dataset``; the ``kto`` objective
does this by itself when it is given pairs. :func:`split_completion` gives
``(prompt, completion, label)`` of a canonical record.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

from tunesmith import hookimpl
from tunesmith.core.data import check_messages, check_str, clean_messages, where
from tunesmith.core.errors import DataError
from tunesmith.plugins.data._base import ChatRendering

_TRUE = {"true", "1", "yes", "y", "t"}
_FALSE = {"false", "0", "no", "n", "f"}


def parse_label(value: Any) -> bool | None:
    """``True``/``False`` for a label (bool, 0/1, or a true/false string), else None."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        v = value.strip().lower()
        if v in _TRUE:
            return True
        if v in _FALSE:
            return False
    return None


def _as_messages(value: Any, role: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return clean_messages(value)


class KTOFormat(ChatRendering):
    name = "kto"
    description = "Unpaired feedback (KTO): prompt, completion, label true|false (strings or message lists)."
    kind = "chat"
    fields = ("prompt", "completion", "label", "system")
    fields_hint = "prompt, completion, label (true|false)[, system]"

    def detect(self, row: dict) -> bool:
        return "prompt" in row and "completion" in row and "label" in row and "chosen" not in row

    def validate(self, row: dict) -> list[str]:
        problems: list[str] = []
        for f in ("prompt", "completion", "label"):
            if f not in row:
                problems.append(f"missing field '{f}'")
        if "prompt" in row and not isinstance(row["prompt"], str):
            problems += check_messages(row["prompt"], "prompt")
            if not problems and row["prompt"][-1].get("role") == "assistant":
                problems.append("'prompt' must not end with an assistant turn (that belongs in 'completion')")
        if "completion" in row:
            c = row["completion"]
            if isinstance(c, str):
                if not c.strip():
                    problems.append("'completion' is empty")
            else:
                bad = check_messages(c, "completion")
                problems += bad
                if not bad and any(m["role"] != "assistant" for m in c):
                    problems.append("'completion' may hold assistant turns only")
        if "label" in row and parse_label(row["label"]) is None:
            problems.append(f"'label' must be true or false, got {row['label']!r}")
        problems += check_str(row, "system", required=False)
        return problems

    def to_canonical(self, row: dict) -> dict:
        prompt = _as_messages(row["prompt"], "user")
        completion = _as_messages(row["completion"], "assistant")
        if row.get("system") and not (prompt and prompt[0]["role"] == "system"):
            prompt = [{"role": "system", "content": row["system"]}] + prompt
        label = parse_label(row["label"])
        if label is None:
            raise DataError(f"'label' must be true or false, got {row['label']!r}")
        return {"messages": prompt + completion, "metadata": {"label": label}}

    def from_canonical(self, record: dict) -> dict:
        prompt, completion, label = split_completion(record)
        meta = {k: v for k, v in (record.get("metadata") or {}).items() if k not in ("label", "source", "line", "row")}
        simple_prompt = len(prompt) == 1 and prompt[0]["role"] == "user"
        out: dict[str, Any] = {
            "prompt": prompt[0]["content"] if simple_prompt else clean_messages(prompt),
            "completion": completion[0]["content"] if len(completion) == 1 else clean_messages(completion),
            "label": label,
        }
        if record.get("metadata") and len(record["metadata"]) > len(meta):
            out["metadata"] = meta  # keeps core from copying the label into metadata again
        return out


# --------------------------------------------------------------------------- helpers
def record_label(record: dict) -> bool | None:
    """The feedback label of a canonical record (``metadata.label``), or None."""
    meta = record.get("metadata") or {}
    value = meta.get("label", record.get("label"))
    return parse_label(value) if value is not None else None


def split_completion(record: dict) -> tuple[list[dict], list[dict], bool]:
    """``(prompt messages, completion messages, label)`` of a canonical unpaired record:
    the completion is the trailing run of assistant turns. DataError (naming the row)
    for a record without a label or an assistant turn."""
    msgs = record.get("messages")
    if not isinstance(msgs, list):
        raise DataError(f"{where(record)}: an unpaired (KTO) record is a chat record, got keys {', '.join(sorted(record))}")
    label = record_label(record)
    if label is None:
        raise DataError(
            f"{where(record)}: no feedback label (metadata.label true|false)",
            hint="KTO rows are {prompt, completion, label}; preference pairs are unpaired automatically",
        )
    n = len(msgs)
    while n > 0 and msgs[n - 1]["role"] == "assistant":
        n -= 1
    if n == len(msgs):
        raise DataError(f"{where(record)}: the record has no assistant turn to score")
    return list(msgs[:n]), list(msgs[n:]), label


def unpair_records(records: Iterable[dict]) -> Iterator[dict]:
    """Preference pairs as unpaired rows: each pair gives its chosen reply labelled
    true and its rejected reply labelled false (same prompt, same metadata plus
    ``label``). Unpaired (chat + label) records pass through unchanged."""
    for rec in records:
        if "chosen" in rec and "rejected" in rec:
            meta = dict(rec.get("metadata") or {})
            prompt = list(rec.get("prompt") or [])
            yield {"messages": prompt + list(rec["chosen"]), "metadata": {**meta, "label": True}}
            yield {"messages": prompt + list(rec["rejected"]), "metadata": {**meta, "label": False}}
        else:
            yield rec


@hookimpl
def register_data_formats(register: Any) -> None:
    register(KTOFormat())
