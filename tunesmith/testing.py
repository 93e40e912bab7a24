"""A pytest plugin for tunesmith and for plugin authors (auto-loaded via ``pytest11``).

Fixtures:

* ``tunesmith_plugin`` - register a plugin object/module for one test:
  ``name = tunesmith_plugin(my_module)``; registries are rebuilt and restored after.
* ``tiny_tokenizer_dir`` - the real SmolLM2 tokenizer (from the bundled GGUF),
  saved once in the user cache.
* ``tiny_model_dir`` - a tiny Llama model (2 layers, hidden 64) built from a config
  with that tokenizer, saved as safetensors: loads in well under a second.
* ``tiny_chat_file`` - a small chat data set (OpenAI messages JSONL) to overfit.

Helpers usable outside pytest: :func:`build_tiny_model`, :func:`tokenizer_dir`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tunesmith.core.paths import GGUF_NAME, cache_dir, default_gguf_path, tokenizer_dir  # noqa: F401 - re-exported


def build_tiny_model(out: Path, *, seed: int = 0, hidden: int = 64, layers: int = 2, tok_dir: Path | None = None) -> Path:
    """A tiny Llama with the real tokenizer, saved as safetensors in ``out``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tok_dir or tokenizer_dir())
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


TINY_CHAT = [
    {"messages": [{"role": "user", "content": f"What is {a} plus {b}?"}, {"role": "assistant", "content": f"{a + b}."}]}
    for a in range(1, 9)
    for b in range(1, 4)
]


@pytest.fixture
def tunesmith_plugin() -> Iterator[Callable[..., str]]:
    """Register in-process plugins for one test; they are removed afterwards."""
    from tunesmith.core import plugins

    names: list[str] = []

    def _register(plugin: Any, name: str | None = None) -> str:
        n = plugins.register_plugin(plugin, name)
        names.append(n)
        return n

    try:
        yield _register
    finally:
        for n in names:
            plugins.unregister_plugin(n)
        plugins.reset()


@pytest.fixture(scope="session")
def tiny_tokenizer_dir() -> Path:
    return tokenizer_dir()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model", tok_dir=tiny_tokenizer_dir)


@pytest.fixture
def tiny_chat_file(tmp_path: Path) -> Path:
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in TINY_CHAT), encoding="utf-8")
    return path
