"""Length filter: characters and tokens of the real tokenizer, prompt and completion apart.

Prompt = system/user turns (a pair's prompt); completion = assistant turns (a pair's
chosen and rejected, each checked); raw text counts as completion. Token counts use
the run's tokenizer, loaded only when a text could exceed a token limit (a text of N
UTF-8 bytes has at most N tokens under byte-level BPE).
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

from pydantic import BaseModel, ConfigDict, Field

from tunesmith import hookimpl
from tunesmith.core.data import completion_text, prompt_text
from tunesmith.core.data_clean import Verdict, count_tokens, get_tokenizer


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_chars: int = Field(10, ge=0, description="Shortest prompt and completion, in characters.")
    max_chars: int = Field(4096, ge=1, description="Longest prompt and completion, in characters.")
    min_prompt_chars: int | None = Field(None, description="Overrides min_chars for the prompt.")
    min_completion_chars: int | None = Field(None, description="Overrides min_chars for the completion.")
    max_prompt_tokens: int | None = Field(2048, description="Longest prompt in tokens (None: no limit).")
    max_completion_tokens: int | None = Field(2048, description="Longest completion in tokens (None: no limit).")
    min_completion_tokens: int = Field(0, ge=0, description="Shortest completion in tokens.")
    batch_size: int = Field(512, ge=1, description="Records tokenised per batch.")


def _sides(record: dict) -> list[tuple[str, str]]:
    """(side, text) pairs checked for a record."""
    if "chosen" in record:
        return [
            ("prompt", prompt_text(record)),
            ("chosen", "\n".join(m["content"] for m in record["chosen"])),
            ("rejected", "\n".join(m["content"] for m in record["rejected"])),
        ]
    if "messages" in record:
        return [("prompt", prompt_text(record)), ("completion", completion_text(record))]
    return [("completion", record.get("text", ""))]


class Length:
    name = "length"
    default_order = 20  # in the default chain (normalize, length, exact_dedupe, near_dedupe, pii, quality)
    description = "Drop rows whose prompt or completion is too short or too long (characters and tokens)."
    Options = Options

    def apply(self, records: Iterable[dict], options: Options | None, context: Any) -> Iterator[Verdict]:
        opts = options or Options()
        batch: list[dict] = []
        for r in records:
            batch.append(r)
            if len(batch) >= opts.batch_size:
                yield from self._batch(batch, opts, context)
                batch = []
        if batch:
            yield from self._batch(batch, opts, context)

    def _batch(self, batch: list[dict], opts: Options, context: Any) -> Iterator[Verdict]:
        verdicts: list[Verdict | None] = []
        need: list[tuple[int, str, str, int]] = []  # (index, side, text, limit)
        for i, r in enumerate(batch):
            reason = None
            for side, text in _sides(r):
                is_prompt = side == "prompt"
                lo = (opts.min_prompt_chars if is_prompt else opts.min_completion_chars)
                lo = opts.min_chars if lo is None else lo
                n = len(text)
                if n < lo:
                    reason = Verdict.reject(r, f"{side} too short: {n} characters < {lo}", "too_short_chars")
                    break
                if n > opts.max_chars:
                    reason = Verdict.reject(r, f"{side} too long: {n} characters > {opts.max_chars}", "too_long_chars")
                    break
                limit = opts.max_prompt_tokens if is_prompt else opts.max_completion_tokens
                if limit is not None and len(text.encode("utf-8")) > limit:
                    need.append((i, side, text, limit))
                if not is_prompt and opts.min_completion_tokens:
                    need.append((i, side, text, -opts.min_completion_tokens))
            verdicts.append(reason)
        if need:
            tok = get_tokenizer(context)
            counts = count_tokens(tok, [t for _, _, t, _ in need])
            for (i, side, _, limit), n in zip(need, counts):
                if verdicts[i] is not None:
                    continue
                if limit >= 0 and n > limit:
                    verdicts[i] = Verdict.reject(batch[i], f"{side} too long: {n} tokens > {limit}", "too_long_tokens")
                elif limit < 0 and n < -limit:
                    verdicts[i] = Verdict.reject(batch[i], f"{side} too short: {n} tokens < {-limit}", "too_short_tokens")
        for r, v in zip(batch, verdicts):
            yield v if v is not None else Verdict.keep(r)


@hookimpl
def register_cleaners(register):
    register(Length())
