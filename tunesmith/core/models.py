"""Loading base models and trained runs.

The public functions other areas use:

* :func:`resolve_model_dir` - the local folder of a ``model:`` section (the model
  source plugin downloads/converts/caches as needed);
* :func:`load_model_and_tokenizer` - ``(model, tokenizer)`` ready for training or
  generation, tokenizer set up by :func:`setup_tokenizer`;
* :func:`setup_tokenizer` - pad token distinct from EOS where possible, padding side,
  end-of-turn token as EOS;
* :func:`load_trained` - base model + adapter (or full model) of a finished run,
  from ``RUN/final/tunesmith.json``;
* :func:`trainable_report` - trainable parameters and their share.

The first argument of the loaders may be the whole :class:`~tunesmith.core.config.Config`
(then relative paths resolve against the config file's folder) or only its
``model`` section (relative paths resolve against the working directory).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tunesmith.core.errors import ConfigError, TunesmithError
from tunesmith.core.registry import member
from tunesmith.core.templates import _PAD_CANDIDATES, end_of_turn_token, setup_tokenizer, sync_model_tokens  # noqa: F401 - re-exported

log = logging.getLogger("tunesmith.models")

#: written into ``final/`` beside the adapter or model
INFO_FILE = "tunesmith.json"

#: tokens that are safe pads when a tokenizer's pad is missing or equals EOS, in order


# --------------------------------------------------------------------------- resolving
def _split(cfg_or_section: Any) -> tuple[Any, Path | None]:
    """(model section, base dir) from a Config or a ModelSection."""
    if hasattr(cfg_or_section, "model") and hasattr(cfg_or_section, "resolve_path"):
        return cfg_or_section.model, Path(cfg_or_section.base_dir)
    return cfg_or_section, None


def source_options(section: Any, registries: Any, *, base_dir: Path | None = None) -> tuple[Any, Any]:
    """(source plugin, validated options with relative paths made absolute)."""
    if registries is None:
        from tunesmith.core.plugins import get_registries

        registries = get_registries()
    source = registries.model_sources.get(section.source)
    options = section._options
    opts_model = getattr(source, "Options", None)
    if options is None and opts_model is not None:
        from pydantic import ValidationError

        try:
            options = opts_model.model_validate(section.plugin_fields())
        except ValidationError as exc:
            raise ConfigError(f"model: {exc.errors()[0]['msg']} ({'.'.join(map(str, exc.errors()[0]['loc']))})", key="model") from None
    if options is not None:
        updates = {}
        for key in ("path", "tokenizer"):
            val = getattr(options, key, None)
            if isinstance(val, str) and val and not Path(val).expanduser().is_absolute():
                base = base_dir or Path.cwd()
                updates[key] = str((base / Path(val).expanduser()).resolve())
        if updates:
            options = options.model_copy(update=updates)
    return source, options


def resolve_model_dir(model_section: Any, registries: Any = None, *, base_dir: Path | None = None) -> Path:
    """The local folder transformers loads for this ``model:`` section (or Config)."""
    section, cfg_base = _split(model_section)
    source, options = source_options(section, registries, base_dir=base_dir or cfg_base)
    path = Path(source.resolve(options))
    if not (path / "config.json").exists():
        raise TunesmithError(f"model source '{section.source}' gave {path}, which has no config.json")
    return path


def pick_dtype(name: str | None) -> Any:
    """torch dtype for ``auto|float32|bfloat16|float16``; auto is bf16 on a GPU that has it, else fp32."""
    import torch

    if name in (None, "auto"):
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
            "float16": torch.float16, "fp16": torch.float16}[name]


def load_model_and_tokenizer(
    model_section: Any,
    registries: Any = None,
    *,
    quantization: Any = None,
    dtype: Any = None,
    padding_side: str = "right",
    device_map: Any = None,
) -> tuple[Any, Any]:
    """(model, tokenizer) for a ``model:`` section (or a whole Config).

    ``quantization`` is a transformers quantization config (QLoRA passes a
    ``BitsAndBytesConfig``); ``dtype`` overrides ``model.dtype``.
    """
    section, _ = _split(model_section)
    path = resolve_model_dir(model_section, registries)
    model, tok = load_from_dir(
        path,
        dtype=dtype if dtype is not None else section.dtype,
        attn_implementation=getattr(section, "attn_implementation", None),
        quantization=quantization,
        padding_side=padding_side,
        device_map=device_map,
    )
    if getattr(model_section, "chat_template", None):
        # a whole Config naming a template: the base renders prompts as the run trains them
        from tunesmith.core.templates import apply_chat_template

        apply_chat_template(model_section, tok, model, registries, quiet=True)
    return model, tok


def load_from_dir(
    path: str | Path,
    *,
    dtype: Any = None,
    attn_implementation: str | None = None,
    quantization: Any = None,
    padding_side: str = "right",
    device_map: Any = None,
    tokenizer_path: str | Path | None = None,
) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype is None or isinstance(dtype, str):
        dtype = pick_dtype(dtype)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_path or path), trust_remote_code=False)
    setup_tokenizer(tok, padding_side=padding_side)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": False}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    fit_embeddings(model, tok)
    sync_model_tokens(model, tok)
    return model, tok


# --------------------------------------------------------------------------- hub ids
#: written into a cached model folder by the model source that made it
SOURCE_FILE = "tunesmith_source.json"


def record_hub_id(model_dir: str | Path, hub_id: str) -> None:
    """Note in ``model_dir/tunesmith_source.json`` which hub repository the folder is a copy of."""
    from tunesmith.core.io import atomic_write_json

    p = Path(model_dir) / SOURCE_FILE
    data = {}
    if p.exists():
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except ValueError:
            data = {}
    if data.get("hub_id") != hub_id:
        data["hub_id"] = hub_id
        atomic_write_json(p, data)


def hub_id_of(model_dir: str | Path | None) -> str | None:
    """The hub repository id a local model folder is a copy of, where known: the model
    source's note (the bundled default: HuggingFaceTB/SmolLM2-135M-Instruct), or the
    Hugging Face cache layout (``.../models--ORG--NAME/snapshots/REV``)."""
    if not model_dir:
        return None
    p = Path(model_dir)
    note = p / SOURCE_FILE
    if note.exists():
        try:
            hub = json.loads(note.read_text(encoding="utf-8")).get("hub_id")
        except ValueError:
            hub = None
        if hub:
            return str(hub)
    parts = p.resolve().parts
    for i, part in enumerate(parts[:-2]):
        if part.startswith("models--") and parts[i + 1] == "snapshots":
            return part[len("models--"):].replace("--", "/", 1)
    return None


def fit_embeddings(model: Any, tokenizer: Any) -> bool:
    """Resize the model's embeddings to the tokenizer when the tokenizer is longer
    (a run that added template tokens); the added rows' trained values come from
    the adapter (peft trainable tokens), so their initial values do not matter.
    Returns whether it resized."""
    emb = model.get_input_embeddings()
    rows = getattr(emb, "num_embeddings", None)
    if rows is None and getattr(emb, "weight", None) is not None:
        rows = emb.weight.shape[0]
    if rows is not None and len(tokenizer) > int(rows):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        return True
    return False


def trainable_report(model: Any) -> dict:
    """Trainable and total parameters and the trainable share in percent."""
    total = trainable = 0
    for p in model.parameters():
        n = p.numel()
        if hasattr(p, "quant_state") or p.__class__.__name__ == "Params4bit":
            n *= 2  # 4-bit weights are packed two per byte
        total += n
        if p.requires_grad:
            trainable += n
    return {"trainable": trainable, "total": total, "share_pct": 100.0 * trainable / max(total, 1)}


def describe_trainable(model: Any, method: Any) -> str:
    r = trainable_report(model)
    merge = "can be merged into the base weights" if member(method, "peft_methods", "mergeable") else "cannot be merged (kept as a separate module)"
    return (
        f"{getattr(method, 'name', 'peft')}: {r['trainable']:,} trainable of {r['total']:,} parameters "
        f"({r['share_pct']:.4f}%); {merge}"
    )


# --------------------------------------------------------------------------- trained runs
def final_dir_of(path: str | Path) -> Path:
    p = Path(path)
    if (p / INFO_FILE).exists():
        return p
    if (p / "final" / INFO_FILE).exists():
        return p / "final"
    raise TunesmithError(f"{p} is neither a finished run directory nor a final/ folder (no {INFO_FILE})")


def read_info(path: str | Path) -> dict:
    return json.loads((final_dir_of(path) / INFO_FILE).read_text(encoding="utf-8"))


def load_trained(
    run_dir_or_final_dir: str | Path,
    *,
    registries: Any = None,
    dtype: Any = None,
    padding_side: str = "right",
    merge: bool = False,
    quantized: bool | None = None,
) -> tuple[Any, Any, dict]:
    """(model, tokenizer, info) of a finished run: the base model with the trained
    adapter applied (or the full fine-tuned model). ``info`` is ``final/tunesmith.json``:
    ``base_model_dir``, ``model`` (source section), ``peft`` (method + options),
    ``objective``, ``max_length``. ``merge=True`` merges a mergeable adapter.

    An adapter trained on a quantised base (QLoRA) is put on the base quantised the
    same way, as it was trained (``quantized=None`` means that, unless merging);
    ``quantized=False`` loads the full-precision base instead."""
    final = final_dir_of(run_dir_or_final_dir)
    info = read_info(final)
    if registries is None:
        from tunesmith.core.plugins import get_registries

        registries = get_registries()
    peft_info = info.get("peft") or {}
    method = registries.peft_methods.get(peft_info.get("method", "lora"))
    opts_model = getattr(method, "Options", None)
    options = opts_model.model_validate(peft_info.get("options") or {}) if opts_model is not None else None
    if dtype is None:
        dtype = info.get("dtype")
    if member(method, "peft_methods", "saves_full_model"):
        model, tok = load_from_dir(final, dtype=dtype, padding_side=padding_side)
    else:
        base = Path(info.get("base_model_dir") or "")
        if not (base / "config.json").exists():
            from tunesmith.core.config import ModelSection

            section = ModelSection.model_validate(info.get("model") or {"source": "default"})
            base = resolve_model_dir(section, registries)
        quant = None
        if quantized is None:
            quantized = not merge
        if quantized and member(method, "peft_methods", "quantization_config") is not None:
            quant = method.quantization_config(options)
        model, tok = load_from_dir(base, dtype=dtype, padding_side=padding_side, tokenizer_path=final, quantization=quant)
        model = method.load(model, final, options)
        sync_model_tokens(model, tok)
    if merge and member(method, "peft_methods", "mergeable") and member(method, "peft_methods", "merge") is not None:
        model = method.merge(model)
    model.eval()
    return model, tok, info


# --------------------------------------------------------------------------- GGUF conversion
def gguf_cache_dir(gguf_file: str | Path) -> Path:
    """Where the dequantised copy of a GGUF file is cached (keyed by name, size, mtime)."""
    import hashlib

    from tunesmith.core.paths import cache_dir

    p = Path(gguf_file).resolve()
    st = p.stat()
    key = hashlib.sha256(f"{p}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{p.stem}-{key}"


def convert_gguf(gguf_file: str | Path, target: str | Path | None = None, *, dtype: str = "float32") -> Path:
    """Dequantise a GGUF file once into a safetensors folder (atomic, locked); returns it.

    transformers 5 refuses ``save_pretrained`` on a GGUF-loaded model, so the weights
    are moved into a model built from the same config and saved from there.
    """
    from filelock import FileLock

    from tunesmith.core.io import atomic_dir

    gguf_file = Path(gguf_file).expanduser().resolve()
    if not gguf_file.is_file():
        raise TunesmithError(f"GGUF file not found: {gguf_file}")
    target = Path(target) if target is not None else gguf_cache_dir(gguf_file)
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").exists():
            return target
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.warning("dequantising %s once into %s (later loads take seconds)", gguf_file.name, target)
        tdtype = pick_dtype(dtype)
        src = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=tdtype)
        tok = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        cfg_dict = src.config.to_dict()
        cfg_dict.pop("quantization_config", None)
        cfg_dict.pop("_name_or_path", None)
        cfg_dict.pop("_model_name_or_path", None)
        config = type(src.config).from_dict(cfg_dict)
        with torch.device("meta"):
            dst = AutoModelForCausalLM.from_config(config, dtype=tdtype)
        dst.load_state_dict(src.state_dict(), assign=True, strict=False)
        dst.tie_weights()
        missing = [n for n, p in dst.named_parameters() if p.is_meta]
        if missing:
            raise TunesmithError(f"could not convert {gguf_file.name}: weights missing for {missing[:3]}")
        with atomic_dir(target, overwrite=True) as tmp:
            dst.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            (tmp / "tunesmith_source.json").write_text(json.dumps({"gguf": str(gguf_file)}), encoding="utf-8")
        del src, dst
    return target
