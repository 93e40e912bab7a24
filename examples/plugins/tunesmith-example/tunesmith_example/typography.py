"""Replaces the built-in ``normalize`` cleaner: same clean-up, plus typographic folding.

Registered with ``replaces="normalize"``, so every config that lists ``normalize``
(or gets it by default) uses this one; ``tunesmith plugins`` shows the built-in as
replaced, and ``--disable example.typography`` brings the built-in back.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any, Iterable, Iterator

from pydantic import BaseModel, ConfigDict, Field

from tunesmith import hookimpl

FOLD = str.maketrans(
    {
        "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'",
        "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"',
        "\u2013": "-", "\u2014": "-", "\u2212": "-",
        "\u2026": "...", "\u00a0": " ",
    }
)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SPACES = re.compile(r"[ \t]+")
_BLANKS = re.compile(r"\n{3,}")


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fold_typography: bool = Field(True, description="Curly quotes, dashes and ellipses to ASCII.")


def clean_text(text: str, fold: bool) -> str:
    text = unicodedata.normalize("NFC", text)
    if fold:
        text = text.translate(FOLD)
    text = _CONTROL.sub("", text)
    text = "\n".join(_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return _BLANKS.sub("\n\n", text).strip()


def _rewrite(record: dict, fold: bool) -> dict:
    out = dict(record)
    if "messages" in record:
        out["messages"] = [{**m, "content": clean_text(str(m.get("content", "")), fold)} for m in record["messages"]]
    if "text" in record:
        out["text"] = clean_text(str(record["text"]), fold)
    for key in ("prompt", "chosen", "rejected"):
        if isinstance(record.get(key), list):
            out[key] = [{**m, "content": clean_text(str(m.get("content", "")), fold)} for m in record[key]]
    return out


class TypographyNormalize:
    name = "typography_normalize"
    default_order = 10  # takes normalize's place in the default chain too
    description = "Whitespace, control characters, NFC, and typographic quotes/dashes folded to ASCII."
    Options = Options

    def apply(self, records: Iterable[dict], options: Options | None, context: Any) -> Iterator[Any]:
        from tunesmith.core.data_clean import Verdict

        opts = options or Options()
        for record in records:
            new = _rewrite(record, opts.fold_typography)
            yield Verdict.keep(new, modified=new != record)


@hookimpl
def register_cleaners(register):
    register(TypographyNormalize(), replaces="normalize")
