"""Rule rewards for GRPO and PPO: deterministic checks of a completion's text.

Each reward follows the ``reward_functions`` contract (see
:func:`tunesmith.hookspecs.training.register_reward_functions`)::

    score(prompts, completions, rows, options, context) -> list[float]

``prompts`` are the prompts' text (the last user turn), ``completions`` the generated
answers, ``rows`` the prompt rows of the data set (``{"prompt": [messages], "answer":
..., "metadata": {...}}`` plus any other column). Scores are in [0, 1], so several
rules combine with weights without one drowning the others.
"""

from __future__ import annotations

import json
import re
import string
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tunesmith import hookimpl

_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_text(text: str) -> str:
    """Case, punctuation and whitespace folded (the usual exact-match normalisation)."""
    return " ".join(text.lower().translate(_PUNCT).split())


def _row_value(row: dict, field: str) -> Any:
    """``field`` from the row, else from its metadata (``a.b`` walks nested dicts)."""
    for source in (row, row.get("metadata") or {}):
        cur: Any = source
        ok = True
        for part in field.split("."):
            if isinstance(cur, dict) and part in cur:
                cur = cur[part]
            else:
                ok = False
                break
        if ok:
            return cur
    return None


# --------------------------------------------------------------------------- exact match
class ExactMatchOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    field: str = Field("answer", description="Row column (or metadata key) holding the expected answer; a list means any of them.")
    mode: Literal["exact", "contains", "startswith"] = Field(
        "exact", description="exact: the whole completion; contains: anywhere in it; startswith: at its start."
    )
    normalize: bool = Field(True, description="Fold case, punctuation and whitespace before comparing.")


class ExactMatch:
    name = "exact_match"
    description = "1 when the completion matches the row's expected answer (exact, contains or startswith), else 0"
    Options = ExactMatchOptions

    def score(self, prompts: list[str], completions: list[str], rows: list[dict], options: ExactMatchOptions, context: Any) -> list[float]:
        from tunesmith.core.errors import DataError

        out = []
        for i, (completion, row) in enumerate(zip(completions, rows)):
            expected = _row_value(row, options.field)
            if expected is None:
                raise DataError(
                    f"the exact_match reward needs '{options.field}' in every prompt row; row {row.get('_row', i + 1)} has none",
                    path=row.get("_source"),
                    line=row.get("_row"),
                )
            answers = expected if isinstance(expected, list) else [expected]
            got = normalize_text(completion) if options.normalize else completion.strip()
            hit = False
            for ans in answers:
                want = normalize_text(str(ans)) if options.normalize else str(ans).strip()
                if options.mode == "exact":
                    hit = got == want
                elif options.mode == "contains":
                    hit = want in got
                else:
                    hit = got.startswith(want)
                if hit:
                    break
            out.append(1.0 if hit else 0.0)
        return out


# --------------------------------------------------------------------------- regex / format
class RegexOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pattern: str = Field(..., description="Python regular expression the completion must match.")
    mode: Literal["search", "fullmatch", "match"] = Field(
        "search", description="search: anywhere; match: at the start; fullmatch: the whole (stripped) completion."
    )
    ignore_case: bool = Field(False, description="Case-insensitive matching.")
    dotall: bool = Field(True, description="'.' also matches newlines.")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        return v


class RegexReward:
    name = "regex"
    description = "1 when the completion matches a regular expression (a required format), else 0"
    Options = RegexOptions

    def score(self, prompts: list[str], completions: list[str], rows: list[dict], options: RegexOptions, context: Any) -> list[float]:
        flags = (re.IGNORECASE if options.ignore_case else 0) | (re.DOTALL if options.dotall else 0)
        rx = re.compile(options.pattern, flags)
        fn = {"search": rx.search, "match": rx.match, "fullmatch": rx.fullmatch}[options.mode]
        return [1.0 if fn(c.strip()) else 0.0 for c in completions]


# --------------------------------------------------------------------------- JSON
class JsonOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    required_keys: list[str] = Field(default_factory=list, description="Keys the top-level JSON object must have.")
    extract: bool = Field(
        True, description="Strip a ```json fence and text around the outermost {...} or [...] before parsing."
    )


def _extract_json(text: str) -> str:
    text = text.strip()
    fence = re.search(r"```(?:json)?\s*(.*?)```", text, re.DOTALL)
    if fence:
        return fence.group(1).strip()
    starts = [i for i in (text.find("{"), text.find("[")) if i >= 0]
    if not starts:
        return text
    start = min(starts)
    end = max(text.rfind("}"), text.rfind("]"))
    return text[start : end + 1] if end > start else text[start:]


class JsonReward:
    name = "json_valid"
    description = "0 when the completion is not valid JSON; 0.5 + 0.5 x share of required keys present when it is"
    Options = JsonOptions

    def score(self, prompts: list[str], completions: list[str], rows: list[dict], options: JsonOptions, context: Any) -> list[float]:
        out = []
        for c in completions:
            text = _extract_json(c) if options.extract else c.strip()
            try:
                obj = json.loads(text)
            except (json.JSONDecodeError, ValueError):
                out.append(0.0)
                continue
            if not options.required_keys:
                out.append(1.0)
                continue
            present = sum(1 for k in options.required_keys if isinstance(obj, dict) and k in obj)
            out.append(0.5 + 0.5 * present / len(options.required_keys))
        return out


# --------------------------------------------------------------------------- length
class LengthOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    unit: Literal["chars", "words", "tokens"] = Field("words", description="What is counted (tokens use the policy's tokenizer).")
    min: int = Field(0, ge=0, description="Shortest length that scores 1.")
    max: int | None = Field(None, ge=0, description="Longest length that scores 1 (None: no upper bound).")
    tolerance: float | None = Field(
        None, gt=0, description="Distance outside the bounds at which the score reaches 0, linearly (default: the bound itself, at least 1)."
    )

    @model_validator(mode="after")
    def _ordered(self) -> "LengthOptions":
        if self.max is not None and self.max < self.min:
            raise ValueError(f"max ({self.max}) is below min ({self.min})")
        return self


class LengthReward:
    name = "length"
    description = "1 when the completion's length (chars, words or tokens) is within [min, max], decaying linearly outside"
    Options = LengthOptions

    def _count(self, text: str, unit: str, context: Any) -> int:
        if unit == "chars":
            return len(text.strip())
        if unit == "words":
            return len(text.split())
        tok = getattr(context, "tokenizer", None)
        if tok is None:
            from tunesmith.core.errors import TunesmithError

            raise TunesmithError("the length reward with unit: tokens needs the run's tokenizer")
        return len(tok(text, add_special_tokens=False)["input_ids"])

    def score(self, prompts: list[str], completions: list[str], rows: list[dict], options: LengthOptions, context: Any) -> list[float]:
        out = []
        for c in completions:
            n = self._count(c, options.unit, context)
            if n < options.min:
                dist, bound = options.min - n, options.min
            elif options.max is not None and n > options.max:
                dist, bound = n - options.max, options.max
            else:
                out.append(1.0)
                continue
            tol = options.tolerance or max(1.0, float(bound))
            out.append(max(0.0, 1.0 - dist / tol))
        return out


# --------------------------------------------------------------------------- keywords
class KeywordOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    words: list[str] = Field(..., min_length=1, description="Strings to look for in the completion.")
    mode: Literal["fraction", "any", "all", "none"] = Field(
        "fraction", description="fraction: share present; any/all: 1 when any/all present; none: 1 when none is present."
    )
    case_sensitive: bool = Field(False, description="Match case exactly.")


class KeywordReward:
    name = "keywords"
    description = "Share of given strings found in the completion (or any / all / none of them)"
    Options = KeywordOptions

    def score(self, prompts: list[str], completions: list[str], rows: list[dict], options: KeywordOptions, context: Any) -> list[float]:
        words = options.words if options.case_sensitive else [w.lower() for w in options.words]
        out = []
        for c in completions:
            text = c if options.case_sensitive else c.lower()
            hits = sum(1 for w in words if w in text)
            if options.mode == "fraction":
                out.append(hits / len(words))
            elif options.mode == "any":
                out.append(1.0 if hits else 0.0)
            elif options.mode == "all":
                out.append(1.0 if hits == len(words) else 0.0)
            else:
                out.append(0.0 if hits else 1.0)
        return out


@hookimpl
def register_reward_functions(register: Any) -> None:
    for reward in (ExactMatch(), RegexReward(), JsonReward(), LengthReward(), KeywordReward()):
        register(reward)
