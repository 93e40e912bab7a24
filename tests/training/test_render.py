"""Rendering: completion-only labels, the end-of-turn token, pad vs EOS, packing semantics."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir: Path):
    from transformers import AutoTokenizer

    from tunesmith.core.models import setup_tokenizer

    return setup_tokenizer(AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir)))


def test_setup_tokenizer_keeps_pad_distinct_from_eos(tok) -> None:
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token is not None and tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "right"


def test_labels_cover_assistant_turns_and_end_of_turn(tok) -> None:
    from tunesmith.core.render import render_chat

    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello there"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4."},
    ]
    r = render_chat(tok, msgs, max_length=512)
    # the ids are exactly the template's tokenisation
    assert r["input_ids"] == tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
    trained = [i for i, l in zip(r["input_ids"], r["labels"]) if l != -100]
    assert tok.decode(trained) == "hello there<|im_end|>4.<|im_end|>"
    assert trained.count(tok.eos_token_id) == 2
    # labels equal ids where trained
    assert all(l in (-100, i) for i, l in zip(r["input_ids"], r["labels"]))
    # without EOS training, the end token is masked
    r2 = render_chat(tok, msgs, max_length=512, train_on_eos=False)
    assert tok.eos_token_id not in [l for l in r2["labels"] if l != -100]
    # completion_only=False trains everything
    r3 = render_chat(tok, msgs, max_length=512, completion_only=False)
    assert r3["labels"] == r3["input_ids"]


def test_truncation_is_reported(tok) -> None:
    from tunesmith.core.render import render_chat

    msgs = [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "ok"}]
    r = render_chat(tok, msgs, max_length=16)
    assert r["truncated"] and len(r["input_ids"]) == 16 and r["n_labels"] == 0


def test_padding_free_and_packing_match_separate_sequences(tiny_model_dir: Path, tok) -> None:
    """Flattened rows with restarting position ids attend within each example only."""
    import torch
    from transformers import AutoModelForCausalLM

    from tunesmith.core.render import TokenCollator, pack_examples, render_chat

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    exs = [render_chat(tok, [{"role": "user", "content": u}, {"role": "assistant", "content": a}])
           for u, a in [("one", "two three"), ("four five six seven", "eight"), ("nine", "ten eleven twelve")]]
    with torch.no_grad():
        sep = [model(torch.tensor([e["input_ids"]]), use_cache=False).logits[0] for e in exs]
        flat = TokenCollator(tok.pad_token_id, padding_free=True)(exs)
        assert "attention_mask" not in flat
        out = model(**{k: v for k, v in flat.items() if k != "labels"}, use_cache=False).logits[0]
        k = 0
        for e, ref in zip(exs, sep):
            n = len(e["input_ids"])
            assert torch.allclose(out[k:k + n], ref, atol=1e-5)
            k += n
        # the first label of each example is masked: no prediction across boundaries
        starts = [0, len(exs[0]["input_ids"]), len(exs[0]["input_ids"]) + len(exs[1]["input_ids"])]
        assert all(flat["labels"][0, s].item() == -100 for s in starts)
        rows = pack_examples(exs, max_length=4096)
        assert len(rows) == 1 and sorted(rows[0]["position_ids"]).count(0) == 3
        padded = TokenCollator(tok.pad_token_id)(exs)
        assert padded["attention_mask"].sum().item() == sum(len(e["input_ids"]) for e in exs)
        assert (padded["labels"][padded["attention_mask"] == 0] == -100).all()


def test_cpt_chunks(tok) -> None:
    from tunesmith.core.render import chunk_tokens, render_text

    seqs = [render_text(tok, "hello world " * n)["input_ids"] for n in (3, 10, 7)]
    blocks = chunk_tokens(seqs, 8)
    assert sum(len(b["input_ids"]) for b in blocks) == sum(len(s) for s in seqs)
    assert all(len(b["input_ids"]) == 8 for b in blocks[:-1])
    assert all(s[-1] == tok.eos_token_id for s in seqs)
