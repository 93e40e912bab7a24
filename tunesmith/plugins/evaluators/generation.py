"""Generation metrics: greedy decoding of a test set, scored against the expected answers.

Reports exact match, normalised exact match (lower case, no punctuation, no
articles, folded whitespace), corpus BLEU (sacrebleu), mean ROUGE-1/2/L F1
(rouge-score, stemmed), mean and p95 latency and tokens per second; when the
expected answers are labels (``mode: classification``, or ``auto`` with a few short
distinct answers), also accuracy and macro-F1.
"""

from __future__ import annotations

import re
import string
from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field

from tunesmith import hookimpl

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


# --------------------------------------------------------------------------- metrics (pure functions)
def normalize_answer(s: str) -> str:
    """SQuAD-style normalisation: lower case, drop punctuation and articles, fold spaces."""
    s = s.lower().translate(_PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Share of predictions equal to their reference (surrounding whitespace ignored)."""
    if not refs:
        return float("nan")
    return sum(p.strip() == r.strip() for p, r in zip(preds, refs)) / len(refs)


def normalized_exact_match(preds: Sequence[str], refs: Sequence[str]) -> float:
    if not refs:
        return float("nan")
    return sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(preds, refs)) / len(refs)


def bleu(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu, 0-100)."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(preds), [list(refs)]).score)


def rouge(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F1 (rouge-score with stemming), 0-1."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for p, r in zip(preds, refs):
        scores = scorer.score(r, p)
        for k in totals:
            totals[k] += scores[k].fmeasure
    n = max(len(refs), 1)
    return {k: v / n for k, v in totals.items()}


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default)."""
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else float("nan")


def match_label(pred: str, labels: Sequence[str]) -> str | None:
    """The label a free-text prediction names: an exact (normalised) match, else the
    label mentioned first (longest on a tie); None when it names none."""
    norm = normalize_answer(pred)
    by_norm = {normalize_answer(l): l for l in labels}
    if norm in by_norm:
        return by_norm[norm]
    best: tuple[int, int, str] | None = None
    for nl, l in by_norm.items():
        if not nl:
            continue
        m = re.search(r"(?<!\w)" + re.escape(nl) + r"(?!\w)", norm)
        if m:
            key = (m.start(), -len(nl), l)
            if best is None or key < best:
                best = key
    return best[2] if best else None


def classification_metrics(preds: Sequence[str | None], refs: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy and macro-F1 over ``labels`` (a prediction of None is wrong for every class)."""
    n = len(refs)
    acc = sum(p == r for p, r in zip(preds, refs)) / n if n else float("nan")
    f1s = []
    for lab in labels:
        tp = sum(p == lab and r == lab for p, r in zip(preds, refs))
        fp = sum(p == lab and r != lab for p, r in zip(preds, refs))
        fn = sum(p != lab and r == lab for p, r in zip(preds, refs))
        f1s.append(2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0)
    return {"accuracy": acc, "macro_f1": sum(f1s) / len(f1s) if f1s else float("nan")}


def looks_like_labels(refs: Sequence[str]) -> bool:
    """A few short distinct answers, each seen at least twice on average."""
    distinct = {normalize_answer(r) for r in refs}
    return (
        len(refs) >= 4
        and 2 <= len(distinct) <= 20
        and len(refs) >= 2 * len(distinct)
        and all(len(r.split()) <= 3 for r in refs)
    )


# --------------------------------------------------------------------------- the plugin
class GenerationOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(None, description="Test set; default: the run's test split (data/test.jsonl).")
    split: Literal["validation", "test"] = Field("test", description="Which split to read when no path is given.")
    max_new_tokens: int = Field(256, ge=1, description="Greedy decoding stops here or at the end-of-sequence token.")
    batch_size: int = Field(
        8, ge=1,
        description="Prompts per generate call (left-padded, similar lengths together); latency is per call, so 1 gives per-request latency.",
    )
    limit: int | None = Field(None, ge=1, description="Evaluate at most this many rows.")
    mode: Literal["auto", "generation", "classification"] = Field(
        "auto", description="classification adds accuracy and macro-F1; auto does so when the answers look like labels."
    )
    labels: list[str] | None = Field(None, description="The label set for classification (default: the distinct expected answers).")
    chat_template: bool = Field(True, description="Render prompts with the tokenizer's chat template.")
    require_expected: bool = Field(False, description="Fail on a row without an expected answer (otherwise it is only timed).")
    progress: bool = Field(True, description="Show a progress bar.")


class GenerationEval:
    name = "generation"
    description = "Greedy decoding: exact match, BLEU, ROUGE-1/2/L, latency, tokens/s; accuracy and macro-F1 for labels."
    Options = GenerationOptions
    lower_is_better = ("latency_mean_ms", "latency_p95_ms")
    neutral_metrics = ("rows", "scored_rows", "new_tokens_mean")
    default_order = 20

    def evaluate(self, model: Any, tokenizer: Any, options: Any, context: Any) -> dict:
        from tunesmith.core.evalset import generate, load_eval_rows, progress_bar, resolve_eval_path

        options = options or GenerationOptions()
        path = resolve_eval_path(options.path, options.split, context, self.name)
        need_expected = options.require_expected or options.mode == "classification"
        rows = load_eval_rows(
            path, need="prompt", need_expected=need_expected, limit=options.limit, registries=getattr(context, "registries", None)
        )
        label = (getattr(context, "state", {}) or {}).get("variant", "")
        bar = progress_bar(len(rows), f"generation {label}".strip(), options.progress)
        try:
            gens = generate(
                model,
                tokenizer,
                rows,
                max_new_tokens=options.max_new_tokens,
                batch_size=options.batch_size,
                chat_template=options.chat_template,
                progress=bar.update,
            )
        finally:
            bar.close()
        return score_generations(rows, gens, options)


def score_generations(rows: list, gens: list, options: GenerationOptions) -> dict:
    """Metrics and samples from rows and their generations (split out for testing)."""
    latencies = [g.latency_s * 1000.0 for g in gens]
    batch_times = {g.batch: g.latency_s for g in gens}
    total_time = sum(batch_times.values())
    total_tokens = sum(g.new_tokens for g in gens)
    metrics: dict[str, float] = {
        "rows": len(rows),
        "latency_mean_ms": sum(latencies) / len(latencies) if latencies else float("nan"),
        "latency_p95_ms": percentile(latencies, 95),
        "tokens_per_s": total_tokens / total_time if total_time > 0 else float("nan"),
        "new_tokens_mean": total_tokens / len(gens) if gens else float("nan"),
    }
    scored = [(r, g) for r, g in zip(rows, gens) if r.expected is not None]
    preds = [g.text for _, g in scored]
    refs = [r.expected for r, _ in scored]
    samples = []
    if scored:
        metrics["scored_rows"] = len(scored)
        metrics["exact_match"] = exact_match(preds, refs)
        metrics["normalized_exact_match"] = normalized_exact_match(preds, refs)
        metrics["bleu"] = bleu(preds, refs)
        metrics.update(rouge(preds, refs))
        labels = options.labels
        if options.mode == "classification" or (options.mode == "auto" and (labels or looks_like_labels(refs))):
            if not labels:
                seen: dict[str, str] = {}
                for r in refs:
                    seen.setdefault(normalize_answer(r), r.strip())
                labels = list(seen.values())
            mapped_refs = [match_label(r, labels) or r for r in refs]
            mapped_preds = [match_label(p, labels) for p in preds]
            metrics.update(classification_metrics(mapped_preds, mapped_refs, labels))
    for r, g in zip(rows, gens):
        s = {
            "line": r.line,
            "prompt": r.prompt_text,
            "expected": r.expected,
            "output": g.text,
            "new_tokens": g.new_tokens,
            "latency_ms": round(g.latency_s * 1000.0, 2),
        }
        if r.expected is not None:
            s["exact_match"] = g.text.strip() == r.expected.strip()
        samples.append(s)
    return {"metrics": metrics, "samples": samples, "data": rows[0].source if rows else None}


@hookimpl
def register_evaluators(register):
    register(GenerationEval())
