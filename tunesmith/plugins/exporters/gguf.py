"""``gguf`` exporter: a llama.cpp GGUF file written with the ``gguf`` package's writer.

Llama-architecture models only (Llama, SmolLM, Mistral-style). Tensors are named and
laid out as llama.cpp's ``convert_hf_to_gguf.py`` does: the q/k projections get its
row permutation, 1-D tensors and norms stay float32, 2-D weights take the chosen
type (a row length not divisible by the block size falls back to f16). The tokenizer
(byte-level BPE "gpt2" vocabulary, merges, token types, special ids) and the chat
template go into the metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tunesmith import hookimpl

TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
#: llama.cpp's LlamaFileType numbers for general.file_type
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "bf16": 32}


class GGUFExporter:
    name = "gguf"
    description = "GGUF file for llama.cpp (f16, bf16, q8_0, q4_0/q4_1/q5_0/q5_1) with tokenizer and chat template"

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        overwrite: bool = Field(False, description="Replace an existing output file.")
        type: Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"] = Field(
            "f16", description="Tensor type of the 2-D weights (llama.cpp's --outtype); norms stay f32."
        )
        tokenizer_pre: str | None = Field(
            None, description="llama.cpp pre-tokenizer name (tokenizer.ggml.pre); detected for SmolLM, else 'default'."
        )
        model_name: str | None = Field(None, description="general.name in the metadata (default: the run's folder name).")
        check: bool = Field(
            False, description="Load the file back with transformers' GGUF reader and compare logits with the merged model."
        )
        qlora_base: Literal["dequantized", "original"] = Field(
            "dequantized", description="QLoRA runs: which float copy of the base the adapter is merged into."
        )

    def default_output(self, run_dir: Path, options: Any) -> Path:
        t = getattr(options, "type", "f16")
        return Path(run_dir) / "exports" / "gguf" / f"model-{t}.gguf"

    def resolve_output(self, output: Path, options: Any) -> Path:
        output = Path(output)
        return output if output.suffix == ".gguf" else output / f"model-{getattr(options, 'type', 'f16')}.gguf"

    def export(self, run_dir: Path, output: Path, options: Any, context: Any) -> Path:
        from tunesmith.core.errors import TunesmithError
        from tunesmith.core.export import MANIFEST, manifest, merge_run, read_run
        from tunesmith.core.io import atomic_path, atomic_write_json

        options = options or self.Options()
        output = self.resolve_output(output, options)
        if output.exists() and not options.overwrite:
            raise TunesmithError(f"{output} already exists", hint="pass --overwrite to replace it")
        run = read_run(run_dir)
        merged = merge_run(run, registries=getattr(context, "registries", None), check=False, qlora_base=options.qlora_base)
        name = options.model_name or run.root.name
        with atomic_path(output, overwrite=options.overwrite) as tmp:
            stats = write_gguf(merged.model, merged.tokenizer, tmp, options.type, name=name,
                               tokenizer_pre=options.tokenizer_pre)
        info: dict[str, Any] = {"type": options.type, "tensors": stats}
        if options.check:
            info["check"] = check_gguf(output, merged.model, merged.tokenizer)
        atomic_write_json(output.with_name(output.name + ".json"), manifest(run, self.name, **info))
        _ = MANIFEST
        return output


# --------------------------------------------------------------------------- writing
def permute_qk(w: Any, n_head: int, n_head_kv: int | None = None) -> Any:
    """llama.cpp's row permutation of q/k weights (rotary halves interleaved)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def detect_pre(tokenizer: Any) -> str:
    vocab = tokenizer.get_vocab()
    ids = [vocab.get(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")]
    if ids == [0, 1, 2] and len(vocab) == 49152:
        return "smollm"
    return "default"


def tokenizer_metadata(tokenizer: Any, vocab_size: int) -> dict:
    """tokens, token types, merges and special ids in llama.cpp's 'gpt2' (byte-level BPE) form."""
    import json as _json

    from tunesmith.core.errors import TunesmithError

    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise TunesmithError("GGUF export needs a fast (tokenizers) tokenizer")
    tj = _json.loads(backend.to_str())
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise TunesmithError(f"GGUF export supports byte-level BPE tokenizers only, not {model.get('type')}")
    vocab = tokenizer.get_vocab()
    id_to_tok = {i: t for t, i in vocab.items()}
    added = {a["content"]: a for a in tj.get("added_tokens") or []}
    n = max(vocab_size, max(id_to_tok) + 1)
    tokens, types = [], []
    for i in range(n):
        tok = id_to_tok.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(5)  # UNUSED
        elif tok in added:
            tokens.append(tok)
            types.append(3 if added[tok].get("special") else 4)  # CONTROL / USER_DEFINED
        else:
            tokens.append(tok)
            types.append(1)  # NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return {"tokens": tokens, "types": types, "merges": merges}


def _quantize(data: Any, qtype: str) -> tuple[Any, Any]:
    """(array, GGMLQuantizationType) of a 2-D float32 tensor."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    target = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0,
              "q4_1": Q.Q4_1, "q5_0": Q.Q5_0, "q5_1": Q.Q5_1}[qtype]
    if target == Q.F32:
        return data.astype(np.float32), Q.F32
    if target == Q.F16:
        return data.astype(np.float16), Q.F16
    try:
        return quants.quantize(data, target), target
    except quants.QuantError:  # row length not a multiple of the block size: llama.cpp falls back to f16
        return data.astype(np.float16), Q.F16


def write_gguf(model: Any, tokenizer: Any, path: str | Path, qtype: str = "f16", *, name: str = "model",
               tokenizer_pre: str | None = None) -> dict:
    """Write a Llama-architecture ``model`` (float weights) and its tokenizer to ``path``."""
    import gguf
    import numpy as np

    from tunesmith.core.errors import TunesmithError

    cfg = model.config
    if getattr(cfg, "model_type", None) not in ("llama", "mistral") :
        raise TunesmithError(f"GGUF export supports Llama-architecture models only, not '{cfg.model_type}'")
    rope = getattr(cfg, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type") or rope.get("type")
    if rope_type not in (None, "default", "linear"):
        raise TunesmithError(f"GGUF export: rope scaling '{rope_type}' is not supported")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        pass  # llama.cpp reads the biases by their standard names; written below
    n_layers = cfg.num_hidden_layers
    n_head = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    rope_theta = getattr(cfg, "rope_theta", None)
    if rope_theta is None:
        rope_theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_block_count(n_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(float(rope_theta))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_file_type(FILE_TYPES[qtype])
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(head_dim)
    if rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    if head_dim != cfg.hidden_size // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)

    meta = tokenizer_metadata(tokenizer, cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tokenizer_pre or detect_pre(tokenizer))
    w.add_token_list(meta["tokens"])
    w.add_token_types(meta["types"])
    w.add_token_merges(meta["merges"])
    for setter, tid in ((w.add_bos_token_id, tokenizer.bos_token_id), (w.add_eos_token_id, tokenizer.eos_token_id),
                        (w.add_unk_token_id, tokenizer.unk_token_id), (w.add_pad_token_id, tokenizer.pad_token_id)):
        if tid is not None:
            setter(int(tid))
    w.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if getattr(tokenizer, "chat_template", None):
        w.add_chat_template(tokenizer.chat_template)
    if qtype not in ("f32", "f16", "bf16"):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    counts: dict[str, int] = {}
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        new = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise TunesmithError(f"GGUF export: no llama.cpp name for the tensor '{hf_name}'")
        data = tensor.detach().float().cpu().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = permute_qk(data, n_head, n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = permute_qk(data, n_head, n_kv)
        if data.ndim <= 1 or new.endswith("_norm.weight") or not new.endswith(".weight"):
            arr, raw = data.astype(np.float32), gguf.GGMLQuantizationType.F32
        else:
            arr, raw = _quantize(np.ascontiguousarray(data), qtype)
        w.add_tensor(new, arr, raw_dtype=raw)
        counts[raw.name] = counts.get(raw.name, 0) + 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    return counts


def check_gguf(path: str | Path, reference_model: Any, tokenizer: Any) -> dict:
    """Load ``path`` with transformers' GGUF reader; compare logits and tokenisation."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.core.export import CHECK_TEXTS, logits_for

    path = Path(path)
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    gtok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    same_ids = all(gtok(t, add_special_tokens=False)["input_ids"] == tokenizer(t, add_special_tokens=False)["input_ids"]
                   for t in CHECK_TEXTS)
    a = logits_for(loaded, tokenizer)
    b = logits_for(reference_model, tokenizer)
    return {
        "max_abs_logit_diff": float((a - b).abs().max()),
        "argmax_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
        "tokenizer_matches": bool(same_ids),
        "chat_template_matches": (gtok.chat_template or "") == (tokenizer.chat_template or ""),
    }


@hookimpl
def register_exporters(register):  # type: ignore[no-untyped-def]
    register(GGUFExporter())
