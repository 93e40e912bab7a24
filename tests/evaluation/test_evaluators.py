"""The built-in evaluators on a tiny model, against independent computations."""

import math

import pytest

import tunesmith
from tunesmith.core.context import RunContext
from tunesmith.core.errors import ConfigError, DataError
from tunesmith.core.evalset import Generation, load_eval_rows
from tunesmith.core.render import render_chat

from .conftest import write_jsonl


@pytest.fixture(scope="module")
def regs():
    return tunesmith.registry()


def _ev(regs, name, **opts):
    ev = regs.evaluators.get(name)
    return ev, ev.Options(progress=False, **opts)


def test_evaluators_are_registered_plugins(regs):
    for name in ("perplexity", "generation", "forgetting"):
        entry = regs.evaluators.entry(name)
        assert entry.plugin.name == f"eval.{name}" and entry.plugin.distribution == "tunesmith"


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(tiny_model_dir, qa_file, regs):
    from tunesmith.core.models import load_from_dir

    model, tok = load_from_dir(tiny_model_dir)
    model.get_output_embeddings().weight.data.zero_()  # every logit 0: p = 1/V for every token
    ev, opts = _ev(regs, "perplexity", path=str(qa_file), batch_size=2)
    res = ev.evaluate(model, tok, opts, RunContext(registries=regs))
    assert res["metrics"]["perplexity"] == pytest.approx(model.config.vocab_size, rel=1e-4)
    assert res["metrics"]["loss"] == pytest.approx(math.log(model.config.vocab_size), rel=1e-5)


def test_perplexity_is_token_weighted_over_the_label_mask(tiny, qa_file, regs):
    import torch

    model, tok = tiny
    ev, opts = _ev(regs, "perplexity", path=str(qa_file), batch_size=3)  # padded batches
    res = ev.evaluate(model, tok, opts, RunContext(registries=regs))
    # by hand: one row at a time, no padding, log-softmax and the training label mask
    total, count = 0.0, 0
    for row in load_eval_rows(qa_file):
        enc = render_chat(tok, row.messages, max_length=1024)
        ids = torch.tensor([enc["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)[0]
        for t in range(1, len(enc["labels"])):
            if enc["labels"][t] != -100:
                total -= float(logp[t - 1, enc["labels"][t]])
                count += 1
    assert res["metrics"]["tokens"] == count
    assert res["metrics"]["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)


def test_generation_is_greedy_and_its_metrics_follow_the_samples(tiny, qa_file, regs):
    import torch

    model, tok = tiny
    ev, opts = _ev(regs, "generation", path=str(qa_file), max_new_tokens=5, limit=3, batch_size=1)
    res = ev.evaluate(model, tok, opts, RunContext(registries=regs))
    m, samples = res["metrics"], res["samples"]
    assert m["rows"] == 3 and len(samples) == 3
    for row, s in zip(load_eval_rows(qa_file, limit=3), samples):
        prompt = tok.apply_chat_template(row.prompt, tokenize=False, add_generation_prompt=True)
        enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, do_sample=False, max_new_tokens=5, pad_token_id=tok.pad_token_id)
        new = out[0, enc["input_ids"].shape[1]:].tolist()
        assert s["output"] == tok.decode(new[: s["new_tokens"]], skip_special_tokens=True).strip()
        assert s["expected"] == row.expected
    assert m["exact_match"] == pytest.approx(sum(s["exact_match"] for s in samples) / 3)
    assert m["latency_mean_ms"] == pytest.approx(sum(s["latency_ms"] for s in samples) / 3, abs=0.01)
    assert m["tokens_per_s"] == pytest.approx(sum(s["new_tokens"] for s in samples) / (sum(s["latency_ms"] for s in samples) / 1000), rel=1e-3)


def test_score_generations_hand_computed(tmp_path):
    from tunesmith.plugins.evaluators.generation import GenerationOptions, score_generations

    f = write_jsonl(tmp_path / "cls.jsonl", [{"prompt": f"q{i}", "expected": lab} for i, lab in enumerate(["yes", "no", "yes", "no"])])
    rows = load_eval_rows(f)
    gens = [
        Generation("yes", 2, 0.100, batch=0),
        Generation("No.", 3, 0.200, batch=1),
        Generation("I would say no", 5, 0.300, batch=2),
        Generation("no", 2, 0.400, batch=3),
    ]
    res = score_generations(rows, gens, GenerationOptions())
    m = res["metrics"]
    assert m["exact_match"] == pytest.approx(2 / 4)  # "yes", "no"
    assert m["normalized_exact_match"] == pytest.approx(3 / 4)  # + "No."
    assert m["latency_mean_ms"] == pytest.approx(250.0)
    assert m["latency_p95_ms"] == pytest.approx(385.0)  # 300 + 0.85 * 100
    assert m["tokens_per_s"] == pytest.approx(12 / 1.0)
    # labels detected: yes/no. predictions yes, no, no, no -> accuracy 3/4
    # yes: tp 1 fp 0 fn 1 -> 2/3; no: tp 2 fp 1 fn 0 -> 4/5
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 4 / 5) / 2)


def test_forgetting_uses_the_adapter_free_base(tiny_model_dir, regs):
    import torch
    from peft import LoraConfig, get_peft_model

    from tunesmith.core.evalset import EvalRow, perplexity_from, token_loss_sums
    from tunesmith.core.models import load_from_dir
    from tunesmith.plugins.evaluators.general_corpus import PASSAGES

    base, tok = load_from_dir(tiny_model_dir)
    rows = [EvalRow(text=t) for t in PASSAGES[:4]]
    ppl_base = perplexity_from(*token_loss_sums(base, tok, rows)[:2])
    model, _ = load_from_dir(tiny_model_dir)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.5)
    ev, opts = _ev(regs, "forgetting", limit=4, max_increase_pct=0.0)
    res = ev.evaluate(model, tok, opts, RunContext(registries=regs))
    m = res["metrics"]
    assert m["general_perplexity_base"] == pytest.approx(ppl_base, rel=1e-5)
    merged = model.merge_and_unload()
    ppl_after = perplexity_from(*token_loss_sums(merged, tok, rows)[:2])
    assert m["general_perplexity"] == pytest.approx(ppl_after, rel=1e-4)
    assert m["forgetting_pct"] == pytest.approx((ppl_after / ppl_base - 1) * 100, rel=1e-3)
    assert m["passed"] == (m["forgetting_pct"] <= 0.0)


def test_bad_evaluation_sets_name_file_and_row(tmp_path, tiny, regs):
    model, tok = tiny
    ctx = RunContext(registries=regs)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine", "expected": "x"}, {"question": "no prompt field"}])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: row has none of the fields .*found: question"):
        load_eval_rows(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    ev, opts = _ev(regs, "generation", path=str(empty))
    with pytest.raises(DataError, match=r"empty\.jsonl: the file is empty"):
        ev.evaluate(model, tok, opts, ctx)
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "just text"}])
    with pytest.raises(DataError, match=r"text\.jsonl:1: row has no prompt"):
        ev.evaluate(model, tok, ev.Options(path=str(text)), ctx)
    noans = write_jsonl(tmp_path / "noans.jsonl", [{"prompt": "a", "expected": "b"}, {"prompt": "c"}])
    with pytest.raises(DataError, match=r"noans\.jsonl:2: row has no expected answer"):
        ev.evaluate(model, tok, ev.Options(path=str(noans), mode="classification"), ctx)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(DataError, match=r"broken\.jsonl:2: invalid JSON"):
        load_eval_rows(broken)
    with pytest.raises(ConfigError, match="perplexity evaluator has no data"):
        regs.evaluators.get("perplexity").evaluate(model, tok, None, ctx)
