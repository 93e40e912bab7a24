"""The real default model (SmolLM2-135M-Instruct) through the evaluators: end-to-end tier."""

import math
from pathlib import Path

import pytest

import tunesmith
from tunesmith.core.context import RunContext

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "data" / "quickstart.jsonl"


@pytest.mark.slow
def test_default_model_generation_and_perplexity(tmp_path):
    from tunesmith.core.config import ModelSection
    from tunesmith.core.evaluation import compare_models, specs_from_names
    from tunesmith.core.models import load_model_and_tokenizer

    regs = tunesmith.registry()
    model, tok = load_model_and_tokenizer(ModelSection(source="default"), regs)
    specs = specs_from_names(
        ["perplexity", "generation"],
        regs,
        {
            "perplexity": {"path": str(QUICKSTART), "limit": 8, "progress": False},
            "generation": {"path": str(QUICKSTART), "limit": 3, "max_new_tokens": 24, "progress": False},
        },
    )
    rep = compare_models(None, (model, tok), specs, regs, tmp_path / "eval", context=RunContext(registries=regs))
    ppl = rep["tuned"]["perplexity"]["metrics"]["perplexity"]
    # an instruction-tuned model finds the JSON answers far likelier than chance (vocabulary 49k)
    assert 1.0 < ppl < 1000 and math.isfinite(ppl)
    samples = rep["samples"]
    assert len(samples) == 3 and all(s["tuned"] for s in samples)  # it answers in words
    assert rep["tuned"]["generation"]["metrics"]["tokens_per_s"] > 0
    assert (tmp_path / "eval" / "report.md").exists()
