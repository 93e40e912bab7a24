"""An evaluator: the share of generated answers that mention required keywords."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tunesmith import hookimpl


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keywords: list[str] = Field(..., min_length=1, description="Each answer is checked for these (case-insensitive).")
    require: Literal["any", "all"] = Field("any", description="An answer counts when it has any / all keywords.")
    path: str | None = Field(None, description="Prompts to answer; default: the run's test split.")
    split: Literal["validation", "test"] = "test"
    limit: int | None = Field(20, ge=1, description="At most this many prompts.")
    max_new_tokens: int = Field(48, ge=1)


class KeywordCoverage:
    name = "keyword_coverage"
    description = "Share of greedy answers that mention the required keywords."
    Options = Options

    neutral_metrics = ("rows",)

    def evaluate(self, model: Any, tokenizer: Any, options: Options, context: Any) -> dict:
        from tunesmith.core.evalset import generate, load_eval_rows, resolve_eval_path

        path = resolve_eval_path(options.path, options.split, context, self.name)
        rows = load_eval_rows(path, need="prompt", limit=options.limit, registries=getattr(context, "registries", None))
        gens = generate(model, tokenizer, rows, max_new_tokens=options.max_new_tokens)
        words = [k.lower() for k in options.keywords]
        check = all if options.require == "all" else any
        hits = [check(w in g.text.lower() for w in words) for g in gens]
        samples = [{"prompt": r.prompt_text, "output": g.text, "hit": h} for r, g, h in zip(rows, gens, hits)]
        return {
            "metrics": {"keyword_coverage": sum(hits) / len(hits) if hits else float("nan"), "rows": len(hits)},
            "samples": samples,
        }


@hookimpl
def register_evaluators(register):
    register(KeywordCoverage())
