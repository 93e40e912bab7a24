"""Forgetting check: perplexity on a general held-out corpus, before and after.

The "before" number comes from, in order: the base model's result of the same
check in a comparison (``context.state["base_results"]``), the tuned model with
its PEFT adapters switched off (exactly the base weights), or a base model the
caller provides as ``context.state["base_model"]`` (with ``"base_tokenizer"``).
``forgetting_pct`` is how much higher the perplexity is after the fine-tune.
"""

from __future__ import annotations

import contextlib
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tunesmith import hookimpl


class ForgettingOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(
        None, description="General held-out corpus (text or chat rows); default: a small built-in general-English corpus."
    )
    batch_size: int = Field(8, ge=1, description="Rows per forward pass.")
    max_length: int = Field(512, ge=8, description="Tokens per row; longer rows are truncated.")
    completion_only: bool = Field(False, description="For chat rows, score only the assistant's tokens.")
    limit: int | None = Field(None, ge=1, description="Evaluate at most this many rows.")
    max_increase_pct: float | None = Field(
        None, description="Flag the run (passed: false) when perplexity rises by more than this percentage."
    )
    progress: bool = Field(True, description="Show a progress bar.")


def _rows(options: ForgettingOptions, context: Any) -> tuple[list, str]:
    from tunesmith.core.evalset import EvalRow, load_eval_rows

    if options.path:
        from tunesmith.core.evalset import resolve_eval_path

        path = resolve_eval_path(options.path, "validation", context, "forgetting")
        rows = load_eval_rows(path, need="any", limit=options.limit, registries=getattr(context, "registries", None))
        return rows, str(path)
    from tunesmith.plugins.evaluators.general_corpus import PASSAGES

    rows = [EvalRow(text=t, source="<built-in general corpus>", line=i + 1) for i, t in enumerate(PASSAGES)]
    return rows[: options.limit] if options.limit else rows, "<built-in general corpus>"


class Forgetting:
    name = "forgetting"
    description = "Perplexity on a general held-out corpus before and after fine-tuning: what the fine-tune cost."
    Options = ForgettingOptions
    lower_is_better = ("general_perplexity", "forgetting_pct")
    neutral_metrics = ("rows", "general_perplexity_base")
    default_order = 30

    def _ppl(self, model: Any, tokenizer: Any, rows: list, options: ForgettingOptions, desc: str) -> float:
        from tunesmith.core.evalset import perplexity_from, score_rows

        total, count, _ = score_rows(model, tokenizer, rows, options, desc)
        return perplexity_from(total, count)

    def evaluate(self, model: Any, tokenizer: Any, options: Any, context: Any) -> dict:
        options = options or ForgettingOptions()
        state = getattr(context, "state", None) or {}
        rows, source = _rows(options, context)
        variant = state.get("variant", "")
        after = self._ppl(model, tokenizer, rows, options, f"forgetting {variant}".strip())
        metrics: dict[str, Any] = {"general_perplexity": after, "rows": len(rows)}
        before, how = None, None
        base_res = (state.get("base_results") or {}).get(self.name)
        if variant == "base":
            how = "this is the base model"
        elif base_res:
            before, how = base_res["metrics"]["general_perplexity"], "base model in the comparison"
        elif state.get("base_model") is not None:
            before = self._ppl(state["base_model"], state.get("base_tokenizer") or tokenizer, rows, options, "forgetting base")
            how = "base model"
        elif hasattr(model, "disable_adapter") and getattr(model, "peft_config", None):
            with _adapters_off(model):
                before = self._ppl(model, tokenizer, rows, options, "forgetting base")
            how = "tuned model with its adapters disabled"
        if before is not None:
            metrics["general_perplexity_base"] = before
            metrics["forgetting_pct"] = (after / before - 1.0) * 100.0
            if options.max_increase_pct is not None:
                metrics["passed"] = metrics["forgetting_pct"] <= options.max_increase_pct
        return {"metrics": metrics, "data": source, "baseline": how}


@contextlib.contextmanager
def _adapters_off(model: Any):
    with model.disable_adapter():
        yield


@hookimpl
def register_evaluators(register):
    register(Forgetting())
