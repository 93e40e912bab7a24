"""Quality heuristics on what the model learns to write (assistant turns, chosen answers, raw text).

* an empty (or too short) turn;
* repeated n-grams: unique-trigram ratio under 0.3 on outputs of 10+ words;
* a dominant word: the most common word over 30% of 10+ words;
* cut off mid-sentence: an output over 100 characters that does not end like a
  sentence (``. ! ? " ' )`` and a few more closers). Not applied to raw text.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Iterable, Iterator

from pydantic import BaseModel, ConfigDict, Field

from tunesmith import hookimpl
from tunesmith.core.data_clean import Verdict

_WORD = re.compile(r"\w+")


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_turn_chars: int = Field(1, ge=0, description="Shortest non-system turn (after stripping), in characters.")
    min_words_for_ratios: int = Field(10, ge=1, description="Word count from which the ratio checks apply.")
    min_unique_trigram_ratio: float = Field(0.3, ge=0, le=1, description="Lowest unique/total word-trigram ratio.")
    max_dominant_word_ratio: float = Field(0.3, gt=0, le=1, description="Highest share of the most common word.")
    cutoff_min_chars: int | None = Field(
        100, description="Outputs longer than this must end like a sentence (None: no check)."
    )
    sentence_endings: str = Field(
        ".!?\"')]}`*:;>…。！？」』”’", description="Characters a finished output may end with."
    )


def check_output(text: str, opts: Options, *, cutoff: bool = True) -> tuple[str, str] | None:
    """(code, reason) of the first problem with an output, or None."""
    words = _WORD.findall(text.lower())
    n = len(words)
    if n >= opts.min_words_for_ratios:
        tri = list(zip(words, words[1:], words[2:]))
        ratio = len(set(tri)) / len(tri)
        if ratio < opts.min_unique_trigram_ratio:
            return "repetition", f"repeated n-grams: unique-trigram ratio {ratio:.2f} < {opts.min_unique_trigram_ratio}"
        word, count = Counter(words).most_common(1)[0]
        share = count / n
        if share > opts.max_dominant_word_ratio:
            return "dominant_word", f"dominant word '{word}': {share:.0%} of {n} words > {opts.max_dominant_word_ratio:.0%}"
    if cutoff and opts.cutoff_min_chars is not None and len(text) > opts.cutoff_min_chars:
        end = text.rstrip()[-1:]
        if end and end not in opts.sentence_endings:
            return "cut_off", f"output cut off mid-sentence (ends with {text.rstrip()[-20:]!r})"
    return None


class Quality:
    name = "quality"
    default_order = 60  # in the default chain (normalize, length, exact_dedupe, near_dedupe, pii, quality)
    description = "Drop rows with empty turns, repeated n-grams, a dominant word or an output cut off mid-sentence."
    Options = Options

    def apply(self, records: Iterable[dict], options: Options | None, context: Any) -> Iterator[Verdict]:
        opts = options or Options()
        for r in records:
            yield self._judge(r, opts)

    def _judge(self, r: dict, opts: Options) -> Verdict:
        if "text" in r and "messages" not in r and "chosen" not in r:
            text = r.get("text", "")
            if len(text.strip()) < max(opts.min_turn_chars, 1):
                return Verdict.reject(r, "empty text", "empty_turn")
            problem = check_output(text, opts, cutoff=False)
            return Verdict.reject(r, problem[1], problem[0]) if problem else Verdict.keep(r)
        turns = r["messages"] if "messages" in r else (r.get("prompt") or []) + r["chosen"] + r["rejected"]
        for i, m in enumerate(turns):
            if m["role"] != "system" and len(m["content"].strip()) < max(opts.min_turn_chars, 1):
                what = "empty" if not m["content"].strip() else "too short"
                return Verdict.reject(r, f"{what} {m['role']} turn (#{i + 1})", "empty_turn")
        outputs = [m["content"] for m in r["messages"] if m["role"] == "assistant"] if "messages" in r else [
            m["content"] for m in r["chosen"]
        ]
        for out in outputs:
            problem = check_output(out, opts)
            if problem:
                return Verdict.reject(r, problem[1], problem[0])
        return Verdict.keep(r)


@hookimpl
def register_cleaners(register):
    register(Quality())
