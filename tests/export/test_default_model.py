"""Slow tier: the real default model (SmolLM2-135M-Instruct) against llama.cpp's own GGUF file."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.export.conftest import make_run
from tunesmith.core.export import export_run

pytestmark = pytest.mark.slow


def test_gguf_matches_llama_cpp_converter(tmp_path: Path) -> None:
    """Our q8_0 writer reproduces llama.cpp's bytes and metadata for the same weights.

    The shipped file was written by llama.cpp's converter. Its token_embd is Q8_0; the
    cached model holds exactly its dequantised values, and Q8_0 re-quantises those to
    the same bytes, so an identical layout gives identical bytes. The q/k weights are
    Q4_1 there: ours must agree with them within one Q4_1 step after the permutation.
    """
    import numpy as np
    from gguf import GGUFReader, dequantize
    from peft import LoraConfig

    from tunesmith.core.models import convert_gguf
    from tunesmith.testing import default_gguf_path

    shipped = GGUFReader(default_gguf_path())
    base = convert_gguf(default_gguf_path())
    # a LoRA adapter with B = 0 (peft's default init): merged == base exactly
    run = make_run(tmp_path / "run", base, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=True))
    import json

    cfg = json.loads((run / "final" / "adapter_model.safetensors").with_name("adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    # undo make_run's random bump of B so the adapter is a no-op
    from safetensors.torch import load_file, save_file

    w = load_file(run / "final" / "adapter_model.safetensors")
    save_file({k: (v * 0 if "lora_B" in k else v) for k, v in w.items()}, run / "final" / "adapter_model.safetensors")

    out = export_run(run, "gguf", tmp_path / "ours.gguf", options={"type": "q8_0"})
    ours = GGUFReader(out)
    t_ours = {t.name: t for t in ours.tensors}
    t_ship = {t.name: t for t in shipped.tensors}
    assert set(t_ours) == set(t_ship)
    assert bytes(t_ours["token_embd.weight"].data.tobytes()) == bytes(t_ship["token_embd.weight"].data.tobytes())
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.7.attn_k.weight"):
        a = dequantize(t_ours[name].data, t_ours[name].tensor_type)
        b = dequantize(t_ship[name].data, t_ship[name].tensor_type)
        step = np.abs(b).max() / 7  # coarser than any Q4_1 rounding error
        assert np.abs(a - b).max() < step, name
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99, name
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.chat_template",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token",
                "llama.block_count", "llama.embedding_length", "llama.attention.head_count",
                "llama.attention.head_count_kv", "llama.rope.freq_base", "llama.feed_forward_length"):
        assert ours.fields[key].contents() == shipped.fields[key].contents(), key
