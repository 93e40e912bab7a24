"""Shared helpers for the data tests: real files on disk, the real tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def chat(user: str, assistant: str, **meta) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}],
            "metadata": dict(meta)}


@pytest.fixture(scope="session")
def regs():
    import tunesmith

    return tunesmith.registry()


@pytest.fixture(scope="session")
def tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run ``tunesmith`` in-process; (exit code, stdout, stderr)."""
    from tunesmith.cli import main

    code = 0
    try:
        main(list(args))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err
