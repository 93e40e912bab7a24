"""``gguf`` exporter: a llama.cpp GGUF file written with the ``gguf`` package's writer.

The architecture is learnt from the ``gguf`` package itself: the model's
``model_type`` names a ``gguf.MODEL_ARCH`` (``mistral`` is llama.cpp's ``llama``,
``gemma3_text`` its ``gemma3``), tensors get their llama.cpp names through
``gguf.get_tensor_name_map(arch, n_layers)``, and the hyper-parameters go under the
``gguf.Keys`` metadata keys read from the transformers config. What differs per
architecture is only what llama.cpp's ``convert_hf_to_gguf.py`` changes in the
tensors themselves (:data:`TENSOR_QUIRKS`: Llama's q/k row permutation, Gemma's
``1 + w`` norms) and the few settings llama.cpp cannot express (:func:`check_config`).
An architecture the gguf package does not know, a tensor it has no name for, or a
setting llama.cpp would silently compute differently is refused with the
architecture's name and what is missing.

1-D tensors and norms stay float32; 2-D weights take the chosen type (a row length
not divisible by the block size falls back to f16, as llama.cpp does). K-quants
(``q4_k_m``, ``q5_k_m``, ``q6_k``, ...) are llama.cpp's own quantiser (the optional
``llamacpp`` extra, ``llama-cpp-python``'s ``llama_model_quantize``) run on an f16
file written first. The tokenizer (byte-level BPE "gpt2" vocabulary, merges, token
types, special ids) and the chat template go into the metadata; an Ollama
``Modelfile`` is written beside the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tunesmith import hookimpl

#: written by the ``gguf`` package's own quantisers
NATIVE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
#: written by llama.cpp's quantiser (llama-cpp-python) from an f16 file
LLAMACPP_TYPES = ("q4_k_m", "q4_k_s", "q5_k_m", "q5_k_s", "q6_k", "q3_k_m", "q2_k")
TYPES = NATIVE_TYPES + LLAMACPP_TYPES
GGUFType = Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1",
                   "q4_k_m", "q4_k_s", "q5_k_m", "q5_k_s", "q6_k", "q3_k_m", "q2_k"]
#: llama.cpp's LlamaFileType numbers for general.file_type
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "bf16": 32,
              "q2_k": 10, "q3_k_m": 12, "q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18}

#: transformers model_type -> llama.cpp architecture name, where they differ
ARCH_ALIASES = {"mistral": "llama", "gemma3_text": "gemma3", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe",
                "cohere": "command-r", "mixtral": "llama"}
#: what llama.cpp's converter changes in the tensors of an architecture
TENSOR_QUIRKS: dict[str, dict[str, Any]] = {
    "llama": {"permute_qk": True},
    "gemma": {"norm_offset": 1.0},
    "gemma2": {"norm_offset": 1.0},
    "gemma3": {"norm_offset": 1.0},
}
#: architectures whose files are checked end to end (train, merge, GGUF read back
#: by transformers and by llama.cpp) in tests/models; others need allow_unverified
VERIFIED = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")


class GGUFExporter:
    name = "gguf"
    description = "GGUF file for llama.cpp (f16, bf16, q8_0, q4_0..q5_1; K-quants via llama.cpp) with tokenizer, chat template and an Ollama Modelfile"

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        overwrite: bool = Field(False, description="Replace an existing output file.")
        type: GGUFType = Field(
            "f16", description="Tensor type of the 2-D weights (llama.cpp's --outtype; K-quants through llama.cpp's quantiser, "
                               "the llamacpp extra); norms stay f32."
        )
        tokenizer_pre: str | None = Field(
            None, description="llama.cpp pre-tokenizer name (tokenizer.ggml.pre); detected for SmolLM, Qwen2 and Llama 3, else 'default'."
        )
        model_name: str | None = Field(None, description="general.name in the metadata (default: the run's folder name).")
        check: bool = Field(
            False, description="Load the file back with transformers' GGUF reader and compare logits with the merged model."
        )
        qlora_base: Literal["dequantized", "original"] = Field(
            "dequantized", description="QLoRA runs: which float copy of the base the adapter is merged into."
        )
        modelfile: bool = Field(True, description="Write an Ollama Modelfile beside the file (FROM, TEMPLATE, PARAMETER stop, SYSTEM).")
        allow_unverified: bool = Field(
            False, description="Write architectures the gguf package maps but tunesmith has not verified end to end."
        )

    def default_output(self, run_dir: Path, options: Any) -> Path:
        t = getattr(options, "type", "f16")
        return Path(run_dir) / "exports" / "gguf" / f"model-{t}.gguf"

    def resolve_output(self, output: Path, options: Any) -> Path:
        output = Path(output)
        return output if output.suffix == ".gguf" else output / f"model-{getattr(options, 'type', 'f16')}.gguf"

    def export(self, run_dir: Path, output: Path, options: Any, context: Any) -> Path:
        from tunesmith.core.errors import TunesmithError
        from tunesmith.core.export import manifest, merge_run, read_run
        from tunesmith.core.io import atomic_path, atomic_write_json

        options = options or self.Options()
        output = self.resolve_output(output, options)
        if output.exists() and not options.overwrite:
            raise TunesmithError(f"{output} already exists", hint="pass --overwrite to replace it")
        if options.type in LLAMACPP_TYPES:
            require_llamacpp(options.type)
        run = read_run(run_dir)
        merged = merge_run(run, registries=getattr(context, "registries", None), check=False, qlora_base=options.qlora_base)
        check_config(merged.model.config, allow_unverified=options.allow_unverified)  # before any file is written
        name = options.model_name or run.root.name
        with atomic_path(output, overwrite=options.overwrite) as tmp:
            stats = write_gguf(merged.model, merged.tokenizer, tmp, options.type, name=name,
                               tokenizer_pre=options.tokenizer_pre, allow_unverified=options.allow_unverified)
        info: dict[str, Any] = {"type": options.type, "tensors": stats, "architecture": gguf_arch_name(merged.model.config)}
        if options.check:
            info["check"] = check_gguf(output, merged.model, merged.tokenizer)
        if options.modelfile:
            from tunesmith.plugins.exporters.modelfile import write_modelfile

            info["modelfile"] = str(write_modelfile(output.with_suffix(".Modelfile"), merged.tokenizer, model=output.name,
                                                    registries=getattr(context, "registries", None)))
        atomic_write_json(output.with_name(output.name + ".json"), manifest(run, self.name, **info))
        return output


# --------------------------------------------------------------------------- architecture
def gguf_arch_name(config: Any) -> str:
    mt = str(getattr(config, "model_type", "") or "")
    return ARCH_ALIASES.get(mt, mt)


def gguf_arch(config: Any) -> Any:
    """The ``gguf.MODEL_ARCH`` of a transformers config, or a TunesmithError."""
    import gguf

    from tunesmith.core.errors import TunesmithError

    name = gguf_arch_name(config)
    for arch, arch_name in gguf.MODEL_ARCH_NAMES.items():
        if arch_name == name:
            return arch
    raise TunesmithError(
        f"GGUF export: the gguf package knows no llama.cpp architecture for model_type '{getattr(config, 'model_type', None)}'",
        hint="llama.cpp cannot load it; export with --format merged (safetensors) instead",
    )


def _rope(config: Any, layer_type: str | None = None) -> dict:
    """The rope parameters (transformers 5 ``rope_parameters``, older ``rope_scaling``/``rope_theta``)."""
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type and isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    elif params and all(isinstance(v, dict) for v in params.values()):
        params = params.get("full_attention") or next(iter(params.values()))
    out = dict(params)
    scaling = getattr(config, "rope_scaling", None)
    if isinstance(scaling, dict) and not out.get("rope_type"):
        out.update(scaling)
    if "rope_theta" not in out and getattr(config, "rope_theta", None) is not None:
        out["rope_theta"] = config.rope_theta
    out.setdefault("rope_type", out.get("type") or "default")
    return out


def head_dim_of(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def check_config(config: Any, *, allow_unverified: bool = False) -> None:
    """Refuse what llama.cpp cannot run as transformers does, naming the architecture and what is missing."""
    from tunesmith.core.errors import TunesmithError

    arch = gguf_arch(config)
    name = gguf_arch_name(config)
    mt = getattr(config, "model_type", name)
    if name not in VERIFIED and not allow_unverified:
        raise TunesmithError(
            f"GGUF export: architecture '{mt}' (llama.cpp '{name}') is not verified by tunesmith "
            f"(verified: {', '.join(VERIFIED)})",
            hint="pass --option allow_unverified=true to write it through the gguf package's tensor map anyway, "
                 "and check it with --option check=true",
        )
    _ = arch
    rope = _rope(config)
    if rope["rope_type"] not in ("default", "linear"):
        raise TunesmithError(
            f"GGUF export of '{mt}': rope scaling '{rope['rope_type']}' is not written (llama.cpp would compute "
            "different positions); supported: none, linear"
        )
    qpas = getattr(config, "query_pre_attn_scalar", None)
    if name in ("gemma2", "gemma3") and qpas is not None:
        hd = head_dim_of(config)
        if float(qpas) not in (float(hd), float(config.hidden_size // config.num_attention_heads)):
            raise TunesmithError(
                f"GGUF export of '{mt}': query_pre_attn_scalar {qpas} is neither head_dim ({hd}) nor hidden/heads; "
                "llama.cpp scales attention by one of those"
            )
    if getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None):
        raise TunesmithError(f"GGUF export of '{mt}': mixture-of-experts tensors (stacked experts) are not written")


def write_metadata(w: Any, config: Any, arch_name: str) -> None:
    """The hyper-parameters under llama.cpp's keys, read from the transformers config."""
    cfg = config
    n_head = int(cfg.num_attention_heads)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_head)
    head_dim = head_dim_of(cfg)
    rope = _rope(cfg)
    w.add_block_count(int(cfg.num_hidden_layers))
    w.add_context_length(int(cfg.max_position_embeddings))
    w.add_embedding_length(int(cfg.hidden_size))
    w.add_feed_forward_length(int(cfg.intermediate_size))
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if getattr(cfg, "rms_norm_eps", None) is not None:
        w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    elif getattr(cfg, "layer_norm_eps", None) is not None or getattr(cfg, "norm_epsilon", None) is not None:
        w.add_layer_norm_eps(float(getattr(cfg, "layer_norm_eps", None) or cfg.norm_epsilon))
    w.add_vocab_size(int(cfg.vocab_size))
    partial = float(getattr(cfg, "partial_rotary_factor", None) or rope.get("partial_rotary_factor") or 1.0)
    w.add_rope_dimension_count(int(head_dim * partial))
    if head_dim != cfg.hidden_size // n_head or arch_name in ("gemma2", "gemma3"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if rope["rope_type"] == "linear":
        import gguf

        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    sw = getattr(cfg, "sliding_window", None)
    if isinstance(sw, int) and sw > 0 and arch_name != "llama":
        w.add_sliding_window(int(sw))
    for key, setter in (("attn_logit_softcapping", w.add_attn_logit_softcapping),
                        ("final_logit_softcapping", w.add_final_logit_softcapping)):
        v = getattr(cfg, key, None)
        if v is not None:
            setter(float(v))
    if arch_name == "gemma3":
        local = _rope(cfg, "sliding_attention").get("rope_theta", getattr(cfg, "rope_local_base_freq", None))
        if local is not None:
            w.add_rope_freq_base_swa(float(local))


# --------------------------------------------------------------------------- writing
def permute_qk(w: Any, n_head: int, n_head_kv: int | None = None) -> Any:
    """llama.cpp's row permutation of q/k weights (rotary halves interleaved)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def detect_pre(tokenizer: Any) -> str:
    """llama.cpp's pre-tokenizer name for the vocabularies tunesmith recognises, else ``default``."""
    vocab = tokenizer.get_vocab()
    if [vocab.get(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2] and len(vocab) >= 49152:
        return "smollm"
    if vocab.get("<|endoftext|>") == 151643:
        return "qwen2"
    if vocab.get("<|begin_of_text|>") == 128000:
        return "llama-bpe"
    if vocab.get("<|endoftext|>") == 50256 and len(vocab) <= 50258:
        return "gpt-2"
    try:  # a plain byte-level pre-tokenizer with its default regex is GPT-2's
        import json as _json

        pre = _json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
        if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
            return "gpt-2"
    except Exception:  # noqa: BLE001 - slow tokenizers: the writer refuses them anyway
        pass
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
    if model.get("byte_fallback") or "ByteLevel" not in _json.dumps(tj.get("pre_tokenizer")):
        raise TunesmithError(
            "GGUF export: this tokenizer is SentencePiece-style BPE (byte fallback, no byte-level pre-tokenizer); "
            "tunesmith writes byte-level BPE ('gpt2') vocabularies only",
            hint="convert with llama.cpp's convert_hf_to_gguf.py from the merged export (--format merged)",
        )
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


def write_tokenizer(w: Any, tokenizer: Any, vocab_size: int, tokenizer_pre: str | None = None) -> None:
    from tunesmith.core.models import end_of_turn_token

    meta = tokenizer_metadata(tokenizer, vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tokenizer_pre or detect_pre(tokenizer))
    w.add_token_list(meta["tokens"])
    w.add_token_types(meta["types"])
    w.add_token_merges(meta["merges"])
    for setter, tid in ((w.add_bos_token_id, tokenizer.bos_token_id), (w.add_eos_token_id, tokenizer.eos_token_id),
                        (w.add_unk_token_id, tokenizer.unk_token_id), (w.add_pad_token_id, tokenizer.pad_token_id)):
        if tid is not None:
            setter(int(tid))
    eot = end_of_turn_token(tokenizer)
    if eot:
        w.add_eot_token_id(int(tokenizer.convert_tokens_to_ids(eot)))
    w.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        w.add_chat_template(template)


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


def gguf_tensors(model: Any, *, allow_unverified: bool = False) -> tuple[Any, list[tuple[str, str, Any]]]:
    """``(arch, [(llama.cpp name, hf name, float32 array)])`` of a float model, in
    llama.cpp's layout; refuses tensors the gguf package has no name for."""
    import gguf

    from tunesmith.core.errors import TunesmithError

    cfg = model.config
    check_config(cfg, allow_unverified=allow_unverified)
    arch = gguf_arch(cfg)
    arch_name = gguf.MODEL_ARCH_NAMES[arch]
    quirks = TENSOR_QUIRKS.get(arch_name, {})
    n_head = int(cfg.num_attention_heads)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_head)
    name_map = gguf.get_tensor_name_map(arch, int(cfg.num_hidden_layers))
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    out, unmapped = [], []
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        if hf_name.endswith(("rotary_emb.inv_freq", "rotary_emb.original_inv_freq")):
            continue
        new = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new is None:
            unmapped.append(hf_name)
            continue
        data = tensor.detach().float().cpu().numpy()
        if quirks.get("permute_qk"):
            if new.endswith("attn_q.weight"):
                data = permute_qk(data, n_head, n_head)
            elif new.endswith("attn_k.weight"):
                data = permute_qk(data, n_head, n_kv)
        if quirks.get("norm_offset") and new.endswith("norm.weight"):
            data = data + quirks["norm_offset"]
        out.append((new, hf_name, data))
    if unmapped:
        more = f" (and {len(unmapped) - 3} more)" if len(unmapped) > 3 else ""
        raise TunesmithError(
            f"GGUF export of '{cfg.model_type}' (llama.cpp '{arch_name}'): the gguf package has no llama.cpp name for "
            + ", ".join(unmapped[:3]) + more,
            hint="llama.cpp would not load these weights; export with --format merged instead",
        )
    return arch, out


def write_gguf(model: Any, tokenizer: Any, path: str | Path, qtype: str = "f16", *, name: str = "model",
               tokenizer_pre: str | None = None, allow_unverified: bool = False) -> dict:
    """Write ``model`` (float weights) and its tokenizer to ``path``; returns tensor counts by type.

    K-quant types write an f16 file first and run llama.cpp's quantiser on it."""
    if qtype in LLAMACPP_TYPES:
        import tempfile

        with tempfile.TemporaryDirectory(dir=str(Path(path).parent)) as tmpdir:
            f16 = Path(tmpdir) / "model-f16.gguf"
            write_gguf(model, tokenizer, f16, "f16", name=name, tokenizer_pre=tokenizer_pre, allow_unverified=allow_unverified)
            llamacpp_quantize(f16, path, qtype)
        return tensor_types(path)
    import gguf
    import numpy as np

    from tunesmith.core.errors import TunesmithError

    arch, tensors = gguf_tensors(model, allow_unverified=allow_unverified)
    arch_name = gguf.MODEL_ARCH_NAMES[arch]
    low = name.lower()
    if ("phi3" in low or "phi-3" in low) and "<|end|>" not in tokenizer.get_vocab():
        # llama.cpp looks the <|end|> token up by the model's name and fails to load otherwise
        raise TunesmithError(f"GGUF export: general.name '{name}' makes llama.cpp expect Phi-3's <|end|> token, "
                             "which this vocabulary lacks", hint="pass --option model_name=NAME without 'phi3'")
    w = gguf.GGUFWriter(str(path), arch_name)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_file_type(FILE_TYPES[qtype])
    write_metadata(w, model.config, arch_name)
    write_tokenizer(w, tokenizer, int(model.config.vocab_size), tokenizer_pre)
    if qtype not in ("f32", "f16", "bf16"):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    counts: dict[str, int] = {}
    for new, _hf, data in tensors:
        if data.ndim <= 1 or new.endswith("norm.weight") or not new.endswith(".weight"):
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


def tensor_types(path: str | Path) -> dict:
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


# --------------------------------------------------------------------------- llama.cpp's quantiser
def require_llamacpp(qtype: str) -> Any:
    """The ``llama_cpp`` module, or a one-line error saying what to install."""
    from tunesmith.core.errors import TunesmithError

    try:
        import llama_cpp
    except ImportError:
        raise TunesmithError(
            f"GGUF type {qtype} needs llama.cpp's quantiser: pip install 'tunesmith[llamacpp]' (llama-cpp-python)",
        ) from None
    return llama_cpp


def llamacpp_quantize(src: str | Path, dst: str | Path, qtype: str) -> None:
    """llama.cpp's ``llama_model_quantize`` from ``src`` (f16) to ``dst`` as ``qtype``."""
    from tunesmith.core.errors import TunesmithError

    llama_cpp = require_llamacpp(qtype)
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}", None)
    if ftype is None:
        raise TunesmithError(f"this llama-cpp-python has no quantisation type {qtype.upper()}")
    import logging
    import os

    if os.environ.get("TUNESMITH_VERBOSE") != "1":  # llama.cpp logs every tensor: keep it off the terminal
        lg = logging.getLogger("llama-cpp-python")
        if lg.level == logging.NOTSET:
            lg.setLevel(logging.ERROR)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 0
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not Path(dst).exists():
        raise TunesmithError(f"llama.cpp's quantiser failed on {Path(src).name} ({qtype}, return code {rc})")


# --------------------------------------------------------------------------- checking
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
