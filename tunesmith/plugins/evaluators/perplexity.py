"""Perplexity: token-weighted over the label mask, batched.

perplexity = exp(sum of token losses / number of scored tokens). With
``completion_only`` (the default) only the assistant's tokens are scored, the same
mask training uses; raw-text rows score every token.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tunesmith import hookimpl


class PerplexityOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(None, description="Evaluation file; default: the run's validation split (data/validation.jsonl).")
    split: Literal["validation", "test"] = Field("validation", description="Which split to read when no path is given.")
    batch_size: int = Field(8, ge=1, description="Rows per forward pass.")
    max_length: int = Field(1024, ge=8, description="Tokens per row; longer rows are truncated.")
    completion_only: bool = Field(True, description="Score only the assistant's tokens (the training label mask).")
    limit: int | None = Field(None, ge=1, description="Evaluate at most this many rows.")
    progress: bool = Field(True, description="Show a progress bar.")


class Perplexity:
    name = "perplexity"
    description = "Perplexity over the label mask (exp of the mean token loss) on a held-out split or any file."
    Options = PerplexityOptions
    lower_is_better = ("perplexity", "loss")
    neutral_metrics = ("tokens", "rows")
    default_order = 10

    def evaluate(self, model: Any, tokenizer: Any, options: Any, context: Any) -> dict:
        from tunesmith.core.evalset import load_eval_rows, perplexity_from, resolve_eval_path, score_rows

        options = options or PerplexityOptions()
        path = resolve_eval_path(options.path, options.split, context, self.name)
        rows = load_eval_rows(path, need="any", limit=options.limit, registries=getattr(context, "registries", None))
        label = (getattr(context, "state", {}) or {}).get("variant", "")
        total, count, _per_row = score_rows(model, tokenizer, rows, options, f"perplexity {label}".strip())
        if count == 0:
            from tunesmith.core.errors import DataError

            raise DataError("no token to score: every row's answer is empty or truncated away", path=str(path))
        return {
            "metrics": {
                "perplexity": perplexity_from(total, count),
                "loss": total / count,
                "tokens": count,
                "rows": len(rows),
            },
            "data": str(path),
        }


@hookimpl
def register_evaluators(register):
    register(Perplexity())
