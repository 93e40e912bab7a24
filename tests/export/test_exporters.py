"""Each exporter's output loaded by the plain library, logits compared with the adapter model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.export.conftest import TEXTS, adapter_logits, make_run, plain_logits
from tunesmith.core.errors import TunesmithError
from tunesmith.core.export import export_run


def test_adapter_export_loads_with_plain_peft(lora_run: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export_run(lora_run, "adapter", tmp_path / "adapter")
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tunesmith_export.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl"))]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and Path(cfg["base_model_name_or_path"]) == tiny_model_dir.resolve()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    got = plain_logits(PeftModel.from_pretrained(base, out).eval(), AutoTokenizer.from_pretrained(out))
    ref = adapter_logits(lora_run, tiny_model_dir)
    base_only = plain_logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), AutoTokenizer.from_pretrained(out))
    assert torch.equal(got, ref)
    assert (ref - base_only).abs().max() > 1e-2  # the adapter really changes the model


def test_export_refuses_existing_output_unless_overwrite(lora_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(TunesmithError, match="already exists"):
        export_run(lora_run, "adapter", out)
    assert (out / "keep.txt").read_text() == "mine"
    export_run(lora_run, "adapter", out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "adapter_model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary leftovers


def test_merged_export_matches_adapter_logits(lora_run: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export_run(lora_run, "merged", tmp_path / "merged")
    assert (out / "model.safetensors").exists() and (out / "generation_config.json").exists()
    assert not list(out.glob("*.bin"))
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not any("lora" in n for n, _ in model.named_parameters())
    got = plain_logits(model, tok)
    ref = adapter_logits(lora_run, tiny_model_dir)
    assert (got - ref).abs().max() < 1e-4
    man = json.loads((out / "tunesmith_export.json").read_text())
    assert man["check"]["max_abs_logit_diff"] < 1e-4


def test_merged_dora(tmp_path: Path, tiny_model_dir: Path) -> None:
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], use_dora=True, init_lora_weights=False)
    run = make_run(tmp_path / "dora-run", tiny_model_dir, cfg, method="dora")
    out = export_run(run, "merged", tmp_path / "merged", options={"dtype": "float32"})
    got = plain_logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), AutoTokenizer.from_pretrained(out))
    assert (got - adapter_logits(run, tiny_model_dir)).abs().max() < 1e-4


def test_prefix_tuning_cannot_merge(tmp_path: Path, tiny_model_dir: Path) -> None:
    from peft import PrefixTuningConfig

    run = make_run(tmp_path / "prefix-run", tiny_model_dir, PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
                   method="prefix_tuning")
    with pytest.raises(TunesmithError, match="cannot be merged.*virtual"):
        export_run(run, "merged", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    with pytest.raises(TunesmithError, match="cannot be merged"):
        export_run(run, "gguf", tmp_path / "m.gguf")
    # the adapter itself still exports
    assert (export_run(run, "adapter", tmp_path / "adapter") / "adapter_model.safetensors").exists()


def test_merged_export_fails_cleanly_when_check_fails(lora_run: Path, tmp_path: Path) -> None:
    with pytest.raises(TunesmithError, match="differ"):
        export_run(lora_run, "merged", tmp_path / "merged", options={"tolerance": -1.0})
    assert list(tmp_path.iterdir()) == []


def test_qlora_merges_into_dequantised_base(tmp_path: Path, tiny_model_dir: Path) -> None:
    import torch
    from peft import LoraConfig, PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    pytest.importorskip("bitsandbytes")
    q = {"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "float32"}
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    run = make_run(tmp_path / "qlora-run", tiny_model_dir, cfg, method="qlora", quantization=q)
    out = export_run(run, "merged", tmp_path / "merged")
    conf = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in conf
    with safe_open(out / "model.safetensors", "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float32 for k in f.keys())
    tok = AutoTokenizer.from_pretrained(out)
    got = plain_logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), tok)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    ref = adapter_logits(run, tiny_model_dir, quantization=bnb)  # the adapter on the 4-bit base it trained on
    diff = (got - ref).abs().max()
    assert diff < 0.05, diff
    # merging into the original full-precision base instead is measurably further away
    far = plain_logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run / "final")
                       .merge_and_unload(), tok)
    assert (far - ref).abs().max() > diff


def test_gguf_loads_back_in_transformers(lora_run: Path, tmp_path: Path) -> None:
    """f16 and q8_0 files read by transformers' GGUF reader give the merged model's logits."""
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = export_run(lora_run, "merged", tmp_path / "merged")
    tok = AutoTokenizer.from_pretrained(merged)
    ref = plain_logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32), tok)
    for qtype, tol in (("f16", 2e-3), ("q8_0", 0.05)):
        out = export_run(lora_run, "gguf", tmp_path / "gguf", options={"type": qtype})
        assert out == tmp_path / "gguf" / f"model-{qtype}.gguf" and out.stat().st_size > 0
        model = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32).eval()
        got = plain_logits(model, tok)
        diff = (got - ref).abs().max()
        assert diff < tol, (qtype, diff)
        # a wrong q/k row layout scrambles attention and fails this
        assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    gtok = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    for t in TEXTS:
        assert gtok(t)["input_ids"] == tok(t)["input_ids"]
    assert gtok.chat_template == tok.chat_template
    assert gtok.eos_token == tok.eos_token
    r = GGUFReader(out)
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.attn_q.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"
    assert "output.weight" not in types  # tied embeddings
    assert r.fields["general.architecture"].contents() == "llama"
    assert r.fields["general.file_type"].contents() == 7
    assert r.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert r.fields["tokenizer.ggml.pre"].contents() == "smollm"


def test_gguf_permutation_is_llama_cpp_layout() -> None:
    """permute_qk is llama.cpp's, and transformers' reader inverts it exactly."""
    import numpy as np
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from tunesmith.plugins.exporters.gguf import permute_qk

    w = np.arange(8 * 2 * 3, dtype=np.float32).reshape(8 * 2, 3)  # 4 heads of dim 4 (q) ...
    back = LlamaTensorProcessor({"num_attention_heads": 4, "num_key_value_heads": 2})._reverse_permute_weights
    assert np.array_equal(back(permute_qk(w, 4, 4), 4, 4), w)
    k = w[:8]  # 2 kv heads of dim 4
    assert np.array_equal(back(permute_qk(k, 4, 2), 4, 2), k)
    # head 0 rows [0,1,2,3] -> [0,2,1,3]: first and second rotary halves interleaved
    assert permute_qk(w, 4, 4)[:4, 0].tolist() == [0.0, 6.0, 3.0, 9.0]


def test_after_export_hook_and_default_output(lora_run: Path, tunesmith_plugin, tmp_path: Path) -> None:
    import shutil

    from tunesmith import hookimpl

    seen = []

    class Observer:
        @hookimpl
        def after_export(self, run, exporter, path):
            seen.append((exporter, Path(path)))

    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    tunesmith_plugin(Observer(), "observer")
    out = export_run(run, "adapter")
    assert out == run / "exports" / "adapter"
    assert seen == [("adapter", out)]


# --------------------------------------------------------------------------- architectures, K-quants, hub ids
def test_gguf_refuses_what_it_cannot_write_with_the_architecture_and_what_is_missing(tmp_path: Path) -> None:
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from tunesmith.core.paths import tokenizer_dir
    from tunesmith.plugins.exporters.gguf import write_gguf

    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(TunesmithError, match="architecture 'gpt2' .*not verified"):
        write_gguf(gpt2, tok, tmp_path / "x.gguf")
    yarn = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                                             "original_max_position_embeddings": 256}))
    with pytest.raises(TunesmithError, match="'llama': rope scaling 'yarn' is not written"):
        write_gguf(yarn, tok, tmp_path / "y.gguf")

    class Extra(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(2))

    plain = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2))
    plain.model.layers[0].mystery = Extra()
    with pytest.raises(TunesmithError, match=r"'llama' \(llama.cpp 'llama'\): the gguf package has no llama.cpp name for "
                                              r"model.layers.0.mystery.w"):
        write_gguf(plain, tok, tmp_path / "z.gguf")
    assert not list(tmp_path.glob("*.gguf"))


def test_kquant_without_llamacpp_is_one_line_saying_what_to_install(lora_run: Path, tmp_path: Path, monkeypatch) -> None:
    import builtins

    real = builtins.__import__

    def no_llamacpp(name, *a, **kw):
        if name == "llama_cpp":
            raise ImportError("No module named 'llama_cpp'")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_llamacpp)
    with pytest.raises(TunesmithError) as info:
        export_run(lora_run, "gguf", tmp_path / "g", options={"type": "q4_k_m"})
    assert str(info.value).splitlines() == [
        "GGUF type q4_k_m needs llama.cpp's quantiser: pip install 'tunesmith[llamacpp]' (llama-cpp-python)"]
    assert not (tmp_path / "g").exists()


def test_kquants_through_llamacpp(lora_run: Path, tmp_path: Path) -> None:
    """The exporter path of a K-quant (f16 first, then llama.cpp's quantiser); the
    logits of q4_k_m, q5_k_m and q6_k files read by llama.cpp are checked per
    architecture in tests/models/test_llamacpp.py."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'tunesmith[llamacpp]')")
    from gguf import GGUFReader

    from tunesmith.core.export import load_tokenizer, read_run

    out = export_run(lora_run, "gguf", tmp_path / "gguf", options={"type": "q4_k_m"})
    assert out.name == "model-q4_k_m.gguf" and not list(out.parent.glob("tmp*"))
    r = GGUFReader(out)
    assert r.fields["general.file_type"].contents() == 15
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert "Q4_K" in types.values() or "Q5_0" in types.values()  # rows of 64 fall back from the 256-blocks
    assert r.fields["tokenizer.chat_template"].contents() == load_tokenizer(read_run(lora_run)).chat_template
    manifest = json.loads(out.with_name(out.name + ".json").read_text())
    assert manifest["type"] == "q4_k_m" and sum(manifest["tensors"].values()) == len(r.tensors)


def test_hub_id_of_known_copies(tmp_path: Path) -> None:
    from tunesmith.core.models import hub_id_of, record_hub_id

    snap = tmp_path / "hub" / "models--Qwen--Qwen2.5-0.5B" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    assert hub_id_of(snap) == "Qwen/Qwen2.5-0.5B"
    own = tmp_path / "cached"
    own.mkdir()
    assert hub_id_of(own) is None
    record_hub_id(own, "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert hub_id_of(own) == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_adapter_names_its_base_by_hub_id_and_the_id_resolves_offline(tmp_path: Path, tiny_model_dir: Path,
                                                                       tunesmith_plugin, monkeypatch) -> None:
    import shutil

    from pydantic import BaseModel

    from tunesmith import hookimpl
    from tunesmith.core.config import ModelSection
    from tunesmith.core.models import record_hub_id, resolve_model_dir

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    record_hub_id(base, "acme/tiny-base")
    run = make_run(tmp_path / "run", base)
    out = export_run(run, "adapter", tmp_path / "adapter")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "acme/tiny-base"
    assert json.loads((out / "tunesmith.json").read_text())["base_model_dir"] == str(base)  # the run keeps the path

    class Bundled:  # a model source that carries a copy of a hub repository, as the default model does
        name = "bundled"
        description = "test copy"
        hub_id = "acme/tiny-base"

        class Options(BaseModel):
            pass

        def resolve(self, options):
            return base

    class _P:
        @hookimpl
        def register_model_sources(self, register):
            register(Bundled())

    tunesmith_plugin(_P(), "test.bundled")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    assert resolve_model_dir(ModelSection.model_validate({"source": "hub", "id": "acme/tiny-base"})) == base


def test_default_model_source_knows_its_hub_id() -> None:
    import tunesmith

    assert tunesmith.registry().model_sources.get("default").hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
