"""A cleaner that rejects rows containing banned words (a house blocklist)."""

from __future__ import annotations

import re
from typing import Any, Iterable, Iterator

from pydantic import BaseModel, ConfigDict, Field

from tunesmith import hookimpl


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    words: list[str] = Field(default_factory=lambda: ["lorem", "ipsum"], description="Words to reject (whole words).")
    case_sensitive: bool = Field(False, description="Match case exactly.")
    roles: list[str] = Field(default_factory=lambda: ["assistant"], description="Message roles to check (chat rows).")


def _texts(record: dict, roles: list[str]) -> Iterator[str]:
    if "messages" in record:
        for m in record["messages"]:
            if m.get("role") in roles:
                yield str(m.get("content", ""))
    elif "text" in record:
        yield str(record["text"])
    else:  # preference pairs
        for key in ("chosen", "rejected"):
            for m in record.get(key) or []:
                if m.get("role") in roles:
                    yield str(m.get("content", ""))


class BannedWords:
    name = "banned_words"
    description = "Reject rows whose text contains a banned word."
    Options = Options

    def apply(self, records: Iterable[dict], options: Options | None, context: Any) -> Iterator[Any]:
        from tunesmith.core.data_clean import Verdict

        opts = options or Options()
        if not opts.words:
            yield from (Verdict.keep(r) for r in records)
            return
        flags = 0 if opts.case_sensitive else re.IGNORECASE
        pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in opts.words) + r")\b", flags)
        for record in records:
            hit = next((m.group(1) for t in _texts(record, opts.roles) if (m := pattern.search(t))), None)
            if hit is None:
                yield Verdict.keep(record)
            else:
                yield Verdict.reject(record, f"banned word '{hit}'", "banned_word")


@hookimpl
def register_cleaners(register):
    register(BannedWords())
