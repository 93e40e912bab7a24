import json
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """(model, tokenizer) of the tiny Llama, tokenizer set up as training does."""
    from tunesmith.core.models import load_from_dir

    return load_from_dir(tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_model_dir_b(tmp_path_factory, tiny_tokenizer_dir):
    """A second tiny model (different seed): a stand-in for a tuned model."""
    from tunesmith.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-b") / "model", seed=1, tok_dir=tiny_tokenizer_dir)


@pytest.fixture
def qa_file(tmp_path):
    rows = [
        {"prompt": "What is the capital of France?", "expected": "Paris."},
        {"messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}]},
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"prompt": "Name a colour.", "answer": "Blue."},
        {"prompt": "Count to three.", "expected": "One, two, three."},
    ]
    p = tmp_path / "qa.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return p


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
