"""``gguf-lora`` exporter: a LoRA adapter as llama.cpp's GGUF LoRA file.

``llama-server -m base.gguf --lora adapter.gguf`` (several ``--lora``, switchable per
request) and Ollama's ``ADAPTER`` serve many adapters over one shared base GGUF.
The file is what llama.cpp's ``convert_lora_to_gguf.py`` writes: ``general.type =
adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``, the architecture, and
per adapted weight two tensors named ``<base tensor name>.lora_a`` (shape r x in)
and ``.lora_b`` (out x r), the base names from the ``gguf`` package's tensor map
and in llama.cpp's layout (Llama's q/k permutation applies to ``lora_b``'s rows).
llama.cpp scales by ``alpha / r``; rsLoRA and per-module ranks or alphas are
folded into ``lora_b`` so every module keeps peft's scale.

By default the base model is written beside it as ``base-<type>.gguf`` (the
adapter only applies to a base whose tensors match), with an Ollama Modelfile
(``FROM`` the base, ``ADAPTER`` the adapter, the chat template). What llama.cpp's
LoRA cannot express is refused with the reason: DoRA, trained tokens or
``modules_to_save`` (whole modules), LoRA on the embeddings, trained biases.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tunesmith import hookimpl

ADAPTER_FILE = "adapter.gguf"


class GGUFLoRAExporter:
    name = "gguf-lora"
    description = "LoRA adapter as a llama.cpp GGUF LoRA file (llama-server --lora, Ollama ADAPTER), with its base GGUF and a Modelfile"

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        overwrite: bool = Field(False, description="Replace an existing output folder.")
        type: Literal["f32", "f16"] = Field("f32", description="Tensor type of lora_a / lora_b.")
        base: bool = Field(True, description="Also write the base model as base-<base_type>.gguf beside the adapter.")
        base_type: Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1",
                           "q4_k_m", "q4_k_s", "q5_k_m", "q5_k_s", "q6_k"] = Field(
            "f16", description="GGUF type of the base file (see the gguf exporter).")
        base_file: str | None = Field(
            None, description="An existing base GGUF to name in the Modelfile instead of writing one (its tensors must match).")
        model_name: str | None = Field(None, description="general.name (default: the run's folder name).")
        modelfile: bool = Field(True, description="Write an Ollama Modelfile (FROM base, ADAPTER adapter, TEMPLATE, stop).")
        allow_unverified: bool = Field(False, description="As the gguf exporter's option of that name.")

    def default_output(self, run_dir: Path, options: Any) -> Path:
        return Path(run_dir) / "exports" / "gguf-lora"

    def export(self, run_dir: Path, output: Path, options: Any, context: Any) -> Path:
        from tunesmith.core.errors import TunesmithError
        from tunesmith.core.export import load_base, load_tokenizer, manifest, read_run
        from tunesmith.core.io import atomic_dir, atomic_write_json
        from tunesmith.plugins.exporters.gguf import check_config, write_gguf

        options = options or self.Options()
        output = Path(output)
        if output.suffix == ".gguf":
            raise TunesmithError("gguf-lora writes a folder (adapter.gguf, base GGUF, Modelfile); give -o a folder")
        if output.exists() and not options.overwrite:
            raise TunesmithError(f"{output} already exists", hint="pass --overwrite to replace it")
        registries = getattr(context, "registries", None)
        run = read_run(run_dir)
        adapter_cfg = run.adapter_config
        check_adapter(run, adapter_cfg)
        tok = load_tokenizer(run, registries)
        base = load_base(run, quantized=False, registries=registries)
        check_config(base.config, allow_unverified=options.allow_unverified)
        if len(tok) > base.get_input_embeddings().num_embeddings:
            raise TunesmithError("gguf-lora: the run added tokens to the vocabulary; a llama.cpp LoRA cannot add tokens to its base",
                                 hint="export --format gguf (merged) instead")
        name = options.model_name or run.root.name
        with atomic_dir(output, overwrite=options.overwrite) as tmp:
            stats = write_gguf_lora(run.final_dir, base.config, tmp / ADAPTER_FILE, options.type, name=name,
                                    adapter_config=adapter_cfg, allow_unverified=options.allow_unverified)
            base_name = options.base_file
            if options.base and base_name is None:
                base_name = f"base-{options.base_type}.gguf"
                write_gguf(base, tok, tmp / base_name, options.base_type, name=f"{name}-base",
                           allow_unverified=options.allow_unverified)
            info: dict[str, Any] = {"adapter": ADAPTER_FILE, "base_gguf": base_name, "type": options.type,
                                    "lora": stats, "quantized_base_trained": run.quantized}
            if options.modelfile and base_name:
                from tunesmith.plugins.exporters.modelfile import write_modelfile

                write_modelfile(tmp / "Modelfile", tok, model=base_name, adapter=ADAPTER_FILE, registries=registries)
                info["modelfile"] = "Modelfile"
            atomic_write_json(tmp / "tunesmith_export.json", manifest(run, self.name, **info))
        return output


def check_adapter(run: Any, cfg: dict) -> None:
    """Refuse what llama.cpp's LoRA cannot express, with the reason."""
    from tunesmith.core.errors import TunesmithError

    if not run.is_peft_adapter:
        raise TunesmithError(f"{run.final_dir} holds no PEFT adapter (method '{run.method}'); gguf-lora exports LoRA adapters",
                             hint="use --format gguf for a merged model")
    ptype = str(cfg.get("peft_type", "")).upper()
    why = None
    if ptype != "LORA":
        why = f"it is a {ptype or 'non-LoRA'} adapter"
    elif cfg.get("use_dora"):
        why = "DoRA rescales each weight by a learnt magnitude, which a llama.cpp LoRA cannot express"
    elif cfg.get("trainable_token_indices"):
        why = "it trains token rows (tokens the chat template added), which a llama.cpp LoRA cannot add to its base"
    elif cfg.get("modules_to_save"):
        why = f"it trains whole modules ({', '.join(cfg['modules_to_save'])}), which a llama.cpp LoRA cannot carry"
    elif cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        why = "it trains biases, which a llama.cpp LoRA cannot carry"
    if why:
        raise TunesmithError(f"gguf-lora cannot export this adapter: {why}",
                             hint="export --format gguf (the adapter merged into one GGUF file) instead")


def _scale(cfg: dict, module: str, r: int) -> float:
    """peft's scale of one module: alpha / r (alpha / sqrt(r) with rsLoRA), per-module patterns applied."""
    import re

    alpha = float(cfg.get("lora_alpha", 8))
    for pat, a in (cfg.get("alpha_pattern") or {}).items():
        if re.search(rf"(^|\.){pat}$", module) or module.endswith(pat):
            alpha = float(a)
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def write_gguf_lora(adapter_dir: str | Path, config: Any, path: str | Path, qtype: str = "f32", *, name: str = "adapter",
                    adapter_config: dict | None = None, allow_unverified: bool = False) -> dict:
    """Write ``adapter_dir``'s LoRA weights as a llama.cpp GGUF LoRA for a base of ``config``."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    from tunesmith.core.errors import TunesmithError
    from tunesmith.plugins.exporters.gguf import TENSOR_QUIRKS, check_config, gguf_arch, permute_qk

    check_config(config, allow_unverified=allow_unverified)
    cfg = adapter_config or json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))
    arch = gguf_arch(config)
    arch_name = gguf.MODEL_ARCH_NAMES[arch]
    quirks = TENSOR_QUIRKS.get(arch_name, {})
    name_map = gguf.get_tensor_name_map(arch, int(config.num_hidden_layers))
    weights = _load_adapter(Path(adapter_dir), load_file)
    pairs: dict[str, dict[str, Any]] = {}
    for key, value in weights.items():
        k = key.removeprefix("base_model.model.")
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in k:
                module = k.split(marker)[0]
                pairs.setdefault(module, {})[part] = value.astype(np.float32)
                break
        else:
            raise TunesmithError(f"gguf-lora: the adapter holds '{key}', which is no LoRA matrix a llama.cpp LoRA can carry")
    if not pairs:
        raise TunesmithError(f"gguf-lora: no LoRA matrices in {adapter_dir}")
    n_head = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
    alpha = float(cfg.get("lora_alpha", 8))
    ranks = {m: int(p["lora_A"].shape[0]) for m, p in pairs.items() if "lora_A" in p}
    tensors, unmapped = [], []
    for module, p in sorted(pairs.items()):
        if "lora_A" not in p or "lora_B" not in p:
            raise TunesmithError(f"gguf-lora: {module} lacks lora_A or lora_B")
        a, b = p["lora_A"], p["lora_B"]
        if a.ndim != 2 or b.ndim != 2:
            raise TunesmithError(f"gguf-lora: {module} is not a linear layer's LoRA (embedding or convolution LoRA)")
        base_name = name_map.get_name(module + ".weight", try_suffixes=(".weight",))
        if base_name is None:
            unmapped.append(module)
            continue
        if base_name.startswith("token_embd") or base_name == "output.weight":
            raise TunesmithError(f"gguf-lora: LoRA on {module} (llama.cpp '{base_name}') is not written")
        r = ranks[module]
        # llama.cpp applies alpha / r with one alpha: fold what differs per module into B
        b = b * (_scale(cfg, module, r) / (alpha / r))
        if quirks.get("permute_qk"):
            if base_name.endswith("attn_q.weight"):
                b = permute_qk(b, n_head, n_head)
            elif base_name.endswith("attn_k.weight"):
                b = permute_qk(b, n_head, n_kv)
        tensors.append((base_name, np.ascontiguousarray(a), np.ascontiguousarray(b)))
    if unmapped:
        raise TunesmithError(
            f"gguf-lora for '{config.model_type}' (llama.cpp '{arch_name}'): the gguf package has no llama.cpp name for "
            + ", ".join(unmapped[:3]) + (f" (and {len(unmapped) - 3} more)" if len(unmapped) > 3 else "")
        )
    w = gguf.GGUFWriter(str(path), arch_name)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_name(name)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    raw = gguf.GGMLQuantizationType.F16 if qtype == "f16" else gguf.GGMLQuantizationType.F32
    dtype = np.float16 if qtype == "f16" else np.float32
    for base_name, a, b in tensors:
        stem = base_name.removesuffix(".weight")
        w.add_tensor(f"{stem}.weight.lora_a", a.astype(dtype), raw_dtype=raw)
        w.add_tensor(f"{stem}.weight.lora_b", b.astype(dtype), raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    return {"modules": len(tensors), "alpha": alpha, "ranks": sorted(set(ranks.values())), "architecture": arch_name}


def _load_adapter(folder: Path, load_file: Any) -> dict:
    from tunesmith.core.errors import TunesmithError

    path = folder / "adapter_model.safetensors"
    if not path.exists():
        raise TunesmithError(f"{folder} has no adapter_model.safetensors")
    return load_file(str(path))


@hookimpl
def register_exporters(register):  # type: ignore[no-untyped-def]
    register(GGUFLoRAExporter())
