"""The quickstart task is one the base model fails: it answers tickets in prose."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[2] / "examples" / "data" / "quickstart.jsonl"


@pytest.mark.slow
def test_base_model_fails_the_quickstart_format() -> None:
    import torch

    import tunesmith
    from tunesmith.core.config import ModelSection
    from tunesmith.core.models import load_model_and_tokenizer

    rows = [json.loads(line) for line in DATA.read_text().splitlines()[:4]]
    model, tok = load_model_and_tokenizer(ModelSection(source="default"), tunesmith.registry())
    model.eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # spinning OpenMP threads crawl on a shared CPU
    try:
        _check(model, tok, rows)
    finally:
        torch.set_num_threads(threads)


def _check(model, tok, rows) -> None:
    import torch

    for r in rows:
        ids = tok.apply_chat_template(r["messages"][:-1], add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
        text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        assert text != r["messages"][-1]["content"]
        with pytest.raises(ValueError):  # not even JSON
            json.loads(text)
