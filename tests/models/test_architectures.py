"""The architecture matrix: for each architecture, on a tiny model built from its
config, LoRA and QLoRA train a few steps, the saved adapter reloads with the
logits the trained model had, the merged export loads in plain transformers, and
the GGUF export (f16 and q8_0) reads back through transformers' GGUF reader with
close logits. tests/models/test_llamacpp.py reads the same files with llama.cpp."""

from __future__ import annotations

import json

import pytest
import torch

from tests.models.archs import ARCHS
from tests.models.conftest import probe_logits

pytestmark = pytest.mark.timeout(300)


def _train(cfg):
    from tunesmith.core.session import train

    return train(cfg)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_lora_train_reload_merge_gguf(arch, arch_dirs, arch_cfg, keep_logits, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.core.export import export_run
    from tunesmith.core.models import load_trained

    base_dir = arch_dirs(arch)
    cfg = arch_cfg(base_dir, name=f"lora-{arch}")
    result = _train(cfg)
    assert result["steps"] == 3
    trained = keep_logits.logits
    assert trained is not None

    # save / reload: the adapter from disk computes what the trained model computed
    model, tok, info = load_trained(result["run_dir"])
    assert info["peft"]["method"] == "lora"
    reloaded = probe_logits(model, tok)
    assert torch.allclose(reloaded, trained, atol=1e-5), (reloaded - trained).abs().max()
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    assert (probe_logits(base, tok) - trained).abs().max() > 1e-3, "training changed nothing"

    # merged export: plain transformers, same logits
    merged_dir = export_run(result["run_dir"], "merged", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert merged.config.model_type == base.config.model_type
    assert (probe_logits(merged, tok) - trained).abs().max() < 1e-4

    # GGUF f16 and q8_0, read back by transformers
    scale = float(trained.abs().max())
    for qtype, rel in (("f16", 0.01), ("q8_0", 0.06)):
        path = export_run(result["run_dir"], "gguf", tmp_path / "gguf", options={"type": qtype, "model_name": "tiny"})
        assert path.name == f"model-{qtype}.gguf"
        manifest = json.loads(path.with_name(path.name + ".json").read_text())
        assert manifest["architecture"] == ("llama" if arch == "mistral" else arch)
        g = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
        gtok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        assert gtok.chat_template == tok.chat_template
        got = probe_logits(g, tok)
        diff = float((got - trained).abs().max())
        assert diff < rel * scale, f"{arch} {qtype}: max logit diff {diff:.4g} (scale {scale:.3g})"
        agree = float((got.argmax(-1) == trained.argmax(-1)).float().mean())
        assert agree >= (0.95 if qtype == "f16" else 0.8), f"{arch} {qtype}: argmax agreement {agree:.2f}"
        modelfile = path.with_suffix(".Modelfile").read_text()
        assert modelfile.startswith(f"FROM ./{path.name}\n")
        assert 'PARAMETER stop "<|im_end|>"' in modelfile


@pytest.mark.parametrize("arch", list(ARCHS))
def test_qlora_train_and_reload(arch, arch_dirs, arch_cfg, keep_logits):
    pytest.importorskip("bitsandbytes")
    from tunesmith.core.models import load_trained

    cfg = arch_cfg(arch_dirs(arch), name=f"qlora-{arch}", training={"max_steps": 2},
                   peft={"method": "qlora", "r": 4, "alpha": 8, "target_modules": "all-linear", "dropout": 0.0})
    result = _train(cfg)
    assert result["steps"] == 2
    model, tok, _info = load_trained(result["run_dir"])  # on the 4-bit base, as trained
    assert any("4bit" in type(m).__name__ for m in model.modules())
    reloaded = probe_logits(model, tok)
    assert torch.allclose(reloaded, keep_logits.logits, atol=1e-4), (reloaded - keep_logits.logits).abs().max()
