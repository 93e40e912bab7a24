"""Batched greedy generation (left padding, prompts grouped by length) gives the
same answers as one prompt at a time, in fp32, on a tiny model."""

import pytest

import tunesmith
from tunesmith.core.context import RunContext
from tunesmith.core.evalset import generate, load_eval_rows, render_prompt

from .conftest import write_jsonl

PROMPTS = [
    "Hi.",
    "What is the capital of France?",
    "Name a colour that is often used for the sky on a clear summer afternoon.",
    "Count to three.",
    "Add 2 and 3, then tell me the result in words and in digits, please.",
    "Why?",
    "Say hello to the whole team in one short sentence.",
    "Translate 'cat' into French.",
    "Give me one word that rhymes with moon.",
    "List the days of the week starting from Monday and ending on Sunday.",
]


@pytest.fixture(scope="module")
def diverse(tiny_model_dir):
    """The tiny Llama with larger random matrices: a freshly initialised one (std
    0.02) answers every prompt with the same token, which would hide a mix-up."""
    import torch

    from tunesmith.core.models import load_from_dir

    model, tok = load_from_dir(tiny_model_dir)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    return model, tok


@pytest.fixture
def prompts_file(tmp_path):
    return write_jsonl(tmp_path / "p.jsonl", [{"prompt": p, "expected": "x"} for p in PROMPTS])


def test_batched_greedy_equals_one_at_a_time(diverse, prompts_file):
    import torch

    model, tok = diverse
    assert next(model.parameters()).dtype == torch.float32
    rows = load_eval_rows(prompts_file)
    lengths = {len(tok(render_prompt(tok, r.prompt), add_special_tokens=False)["input_ids"]) for r in rows}
    assert len(lengths) > 3  # the batches really are padded
    one = generate(model, tok, rows, max_new_tokens=12, batch_size=1)
    assert len({g.text for g in one}) > 5  # the prompts give different answers
    for bs in (3, 4, 10):
        got = generate(model, tok, rows, max_new_tokens=12, batch_size=bs)
        assert [g.text for g in got] == [g.text for g in one], bs
        assert [g.new_tokens for g in got] == [g.new_tokens for g in one], bs
        assert len({g.batch for g in got}) == -(-len(rows) // bs)
    assert tok.padding_side == "right"  # restored


def test_generation_evaluator_batches_by_default(diverse, prompts_file):
    model, tok = diverse
    regs = tunesmith.registry()
    ev = regs.evaluators.get("generation")
    assert ev.Options().batch_size == 8
    res = ev.evaluate(model, tok, ev.Options(path=str(prompts_file), max_new_tokens=6, progress=False), RunContext(registries=regs))
    single = ev.evaluate(
        model, tok, ev.Options(path=str(prompts_file), max_new_tokens=6, batch_size=1, progress=False), RunContext(registries=regs)
    )
    assert [s["output"] for s in res["samples"]] == [s["output"] for s in single["samples"]]
    assert [s["prompt"] for s in res["samples"]] == PROMPTS
