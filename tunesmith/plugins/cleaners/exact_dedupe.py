"""Exact dedupe on normalised content (case, punctuation and whitespace folded); first one wins."""

from __future__ import annotations

import hashlib
from typing import Any, Iterable, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field

from tunesmith import hookimpl
from tunesmith.core.data import prompt_text, where
from tunesmith.core.data_clean import Verdict, dedupe_text, fold


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fold: bool = Field(True, description="Compare text with case, punctuation and whitespace folded.")
    on: Literal["record", "prompt"] = Field(
        "record", description="Compare whole records, or prompts only (one answer per prompt)."
    )


def dedupe_key(record: dict, opts: Options) -> bytes:
    text = prompt_text(record) if opts.on == "prompt" and "text" not in record else dedupe_text(record)
    if opts.fold:
        text = fold(text)
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class ExactDedupe:
    name = "exact_dedupe"
    default_order = 30  # in the default chain (normalize, length, exact_dedupe, near_dedupe, pii, quality)
    description = "Drop exact duplicates of normalised content (case, punctuation, whitespace folded)."
    Options = Options

    def apply(self, records: Iterable[dict], options: Options | None, context: Any) -> Iterator[Verdict]:
        opts = options or Options()
        seen: dict[bytes, str] = {}
        for r in records:
            key = dedupe_key(r, opts)
            first = seen.get(key)
            if first is not None:
                yield Verdict.reject(r, f"exact duplicate of {first}", "exact_duplicate")
            else:
                seen[key] = where(r)
                yield Verdict.keep(r)


@hookimpl
def register_cleaners(register):
    register(ExactDedupe())
