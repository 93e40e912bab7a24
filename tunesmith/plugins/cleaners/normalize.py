"""Text normalisation: Unicode NFC, control characters out, whitespace tidied, valid UTF-8."""

from __future__ import annotations

import re
import unicodedata
from typing import Any, Iterable, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field

from tunesmith import hookimpl
from tunesmith.core.data import map_texts
from tunesmith.core.data_clean import Verdict

# C0/C1 controls except tab and newline; lone surrogates (not encodable as UTF-8)
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff\ufeff]")
_INNER_SPACE = re.compile("(?<=\\S)[ \t\u00a0\u2000-\u200a\u202f\u205f\u3000]+(?=\\S)")
_TRAILING = re.compile("[ \t\u00a0\u3000]+(?=\n)")
_BLANK_LINES = re.compile("\n{3,}")


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    form: Literal["NFC", "NFKC"] = Field("NFC", description="Unicode normal form.")
    collapse_spaces: bool = Field(
        True, description="Collapse runs of spaces/tabs between words to one space (indentation is kept)."
    )
    max_blank_lines: int = Field(1, ge=0, description="Longest run of blank lines kept.")
    strip: bool = Field(True, description="Strip leading/trailing whitespace of every text.")


def normalize_text(text: str, opts: Options) -> str:
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    if not text.isascii():
        text = unicodedata.normalize(opts.form, text)
    if opts.collapse_spaces:
        text = _INNER_SPACE.sub(" ", text)
        text = _TRAILING.sub("", text)
    if "\n\n\n" in text:
        text = _BLANK_LINES.sub("\n" * (opts.max_blank_lines + 1), text)
    return text.strip() if opts.strip else text


class Normalize:
    name = "normalize"
    default_order = 10  # in the default chain (normalize, length, exact_dedupe, near_dedupe, pii, quality)
    description = "Normalise text: Unicode NFC, drop control characters, tidy whitespace."
    Options = Options

    def apply(self, records: Iterable[dict], options: Options | None, context: Any) -> Iterator[Verdict]:
        opts = options or Options()
        fn = lambda t: normalize_text(t, opts)  # noqa: E731
        for r in records:
            new = map_texts(r, fn)
            yield Verdict.keep(new, modified=new is not r)


@hookimpl
def register_cleaners(register):
    register(Normalize())
