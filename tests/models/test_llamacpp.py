"""llama.cpp itself reads what tunesmith exports (needs the ``llamacpp`` extra,
llama-cpp-python; skipped with the reason otherwise): every architecture of the
matrix as f16, q8_0 and the K-quants, and a GGUF LoRA adapter over its base GGUF
that answers as the merged model does. llama.cpp runs in a subprocess, so a crash
(seen with a natively-optimised build on quantised files) fails the test instead
of ending the session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.models.archs import ARCHS
from tests.models.conftest import PROBE

try:
    import llama_cpp  # noqa: F401

    HAVE_LLAMACPP = True
except ImportError:  # pragma: no cover - depends on the extra
    HAVE_LLAMACPP = False

#: printed by pytest (-ra) where the tier skips, as in CI, which does not install the extra
SKIP_REASON = ("llama.cpp tier skipped: llama-cpp-python is not installed (the optional extra: "
               "CMAKE_ARGS=\"-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON\" pip install 'tunesmith[llamacpp]')")
pytestmark = [
    pytest.mark.skipif(not HAVE_LLAMACPP, reason=SKIP_REASON),
    pytest.mark.timeout(300),
]
PROBE_SCRIPT = Path(__file__).with_name("llamacpp_probe.py")


def llamacpp(files: list[dict], text: str = PROBE, generate: int = 0) -> list[dict]:
    job = json.dumps({"text": text, "files": [{k: str(v) if v else None for k, v in f.items()} for f in files],
                      "generate": generate})
    proc = subprocess.run([sys.executable, str(PROBE_SCRIPT), job], capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise AssertionError(f"llama.cpp failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def _hf_logits(model, tok, text=PROBE):
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        return ids[0].tolist(), model(input_ids=ids).logits[0].float().numpy()


#: how far llama.cpp's logits may stray from transformers', relative to the largest logit
TOLERANCE = {"f16": 0.01, "q8_0": 0.06, "q6_k": 0.1, "q5_k_m": 0.2, "q4_k_m": 0.3}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_llamacpp_reads_every_type(arch, arch_dirs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.plugins.exporters.gguf import write_gguf

    d = arch_dirs(arch)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(d)
    ids, ref = _hf_logits(model, tok)
    files = []
    for qtype in TOLERANCE:
        path = tmp_path / f"{arch}-{qtype}.gguf"
        write_gguf(model, tok, path, qtype, name="tiny")
        files.append({"model": path})
    results = llamacpp(files, generate=4)
    scale = float(np.abs(ref).max())
    import gguf

    for qtype, res, f in zip(TOLERANCE, results, files):
        got = np.array(res["scores"])
        diff = float(np.abs(got - ref).max())
        kinds = sorted({t.tensor_type.name for t in gguf.GGUFReader(str(f["model"])).tensors if len(t.shape) > 1})
        # shown by `pytest -rP`: docs/models.md's per-type table comes from these lines
        print(f"{arch} {qtype}: max logit diff / largest logit {diff / scale:.3f}; 2-D tensor types {kinds}")
    for qtype, res in zip(TOLERANCE, results):
        assert res["ids"] == ids, f"{arch} {qtype}: llama.cpp tokenises differently"
        got = np.array(res["scores"])
        diff = float(np.abs(got - ref).max())
        assert diff < TOLERANCE[qtype] * scale, f"{arch} {qtype}: max logit diff {diff:.4g} (scale {scale:.3g})"
        assert len(res["generated"]) == 4
        assert res["metadata"]["tokenizer.chat_template"] == tok.chat_template
    # llama.cpp's greedy answer (f16) is transformers' greedy answer, up to near-ties of a random model
    gen = results[0]["generated"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids + gen])).logits[0].float()
    for step, token in enumerate(gen):
        row = logits[len(ids) - 1 + step]
        assert float(row.max() - row[token]) < TOLERANCE["f16"] * scale, f"{arch}: step {step} is not greedy"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "phi3"])
def test_gguf_lora_over_base_answers_as_merged(arch, arch_dirs, arch_cfg, tmp_path):
    import gguf

    from tunesmith.core.export import export_run
    from tunesmith.core.session import train

    cfg = arch_cfg(arch_dirs(arch), name=f"lora-{arch}", training={"max_steps": 4},
                   peft={"method": "lora", "r": 4, "alpha": 16, "target_modules": "all-linear", "dropout": 0.0,
                         "use_rslora": arch == "qwen2"})
    run = train(cfg)["run_dir"]
    out = export_run(run, "gguf-lora", tmp_path / "lora", options={"base_type": "f32", "model_name": "tiny"})
    adapter, base = out / "adapter.gguf", out / "base-f32.gguf"
    reader = gguf.GGUFReader(str(adapter))
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["adapter.lora.alpha"] == 16.0
    names = [t.name for t in reader.tensors]
    assert names and all(n.endswith((".weight.lora_a", ".weight.lora_b")) for n in names)
    assert "blk.0.attn_output.weight.lora_a" in names
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./base-f32.gguf\nADAPTER ./adapter.gguf\n" in modelfile
    merged = export_run(run, "gguf", tmp_path / "merged", options={"type": "f32", "model_name": "tiny"})
    res_base, res_lora, res_merged = llamacpp([{"model": base}, {"model": base, "lora": adapter}, {"model": merged}],
                                              generate=6)
    lora, merged_s, plain = (np.array(r["scores"]) for r in (res_lora, res_merged, res_base))
    assert np.abs(lora - merged_s).max() < 1e-3 * max(1.0, np.abs(merged_s).max())
    assert np.abs(plain - merged_s).max() > 1e-2, "the adapter changed nothing"
    assert res_lora["generated"] == res_merged["generated"]


def test_gguf_lora_refuses_what_llamacpp_cannot_express(arch_dirs, arch_cfg, tmp_path):
    from tunesmith.core.errors import TunesmithError
    from tunesmith.core.export import export_run
    from tunesmith.core.session import train

    cfg = arch_cfg(arch_dirs("llama"), name="dora", training={"max_steps": 1},
                   peft={"method": "dora", "r": 4, "alpha": 8, "target_modules": "all-linear", "dropout": 0.0})
    run = train(cfg)["run_dir"]
    with pytest.raises(TunesmithError, match="DoRA"):
        export_run(run, "gguf-lora", tmp_path / "x")
