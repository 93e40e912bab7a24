"""``vllm`` serving engine: checks each adapter against vLLM's LoRA limits, then starts
``vllm serve BASE --enable-lora --lora-modules name=path ...``.

vLLM loads a PEFT LoRA folder as it is, but only a subset of what peft can train:
one rank per adapter up to ``--max-lora-rank`` (1, 8, 16, 32, 64, 128, 256, 320 or
512; vLLM's default 16), no DoRA, no ``modules_to_save``, no trained biases, LoRA on
linear layers only (not on embeddings or the output head). An adapter outside these
limits makes vLLM fail at start-up or, worse, load it differently from how it was
trained, so ``tunesmith serve --engine vllm`` refuses it first, naming the adapter and
the reason. The checks read ``adapter_config.json`` and the shapes in
``adapter_model.safetensors`` (no tensor is loaded) against the base model's modules
(built on the meta device: no weights are read either).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import click
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tunesmith import hookimpl

#: the values vLLM accepts for --max-lora-rank (vllm/config/lora.py, MaxLoRARanks)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class VllmOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_lora_rank: int | None = Field(
        None, description="vLLM's --max-lora-rank; default: the smallest allowed value that fits every adapter.")
    max_loras: int | None = Field(None, ge=1, description="Adapters in one batch (--max-loras); default: all of them.")
    executable: str = Field("vllm", description="The vllm command.")
    served_base_name: str = Field("base", description="--served-model-name of the base model (tunesmith's name: base).")
    dtype: str = Field("auto", description="--dtype")
    max_model_len: int | None = Field(None, ge=1, description="--max-model-len")
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1, description="--gpu-memory-utilization")
    tensor_parallel_size: int | None = Field(None, ge=1, description="--tensor-parallel-size")
    extra_args: list[str] = Field(default_factory=list, description="More arguments for vllm serve, passed as they are.")

    @field_validator("max_lora_rank")
    @classmethod
    def _rank(cls, v: int | None) -> int | None:
        if v is not None and v not in VLLM_LORA_RANKS:
            raise ValueError(f"vLLM accepts --max-lora-rank {', '.join(map(str, VLLM_LORA_RANKS))}, not {v}")
        return v


class VllmEngine:
    name = "vllm"
    description = "Hand-off to vLLM: checks adapters against its LoRA limits, then runs vllm serve --enable-lora"
    Options = VllmOptions

    # -- what the command reads --------------------------------------------------
    def check(self, spec: Any, options: VllmOptions) -> list[str]:
        plan = self._plan(spec, options)
        return plan["problems"]

    def command(self, spec: Any, options: VllmOptions) -> list[str]:
        plan = self._plan(spec, options)
        argv = [options.executable, "serve", plan["base"], "--host", spec.host, "--port", str(spec.port),
                "--served-model-name", options.served_base_name, "--dtype", options.dtype]
        if plan["adapters"]:
            argv += ["--enable-lora", "--max-lora-rank", str(plan["max_lora_rank"]),
                     "--max-loras", str(options.max_loras or len(plan["adapters"])), "--lora-modules"]
            argv += [f"{name}={path}" for name, path in plan["adapters"].items()]
        for flag, value in (("--max-model-len", options.max_model_len),
                            ("--gpu-memory-utilization", options.gpu_memory_utilization),
                            ("--tensor-parallel-size", options.tensor_parallel_size)):
            if value is not None:
                argv += [flag, str(value)]
        return argv + list(options.extra_args)

    def serve(self, spec: Any, options: VllmOptions) -> None:
        from tunesmith.core.errors import TunesmithError

        problems = self.check(spec, options)
        if problems:
            raise TunesmithError("vLLM cannot serve this: " + "; ".join(problems))
        argv = self.command(spec, options)
        exe = shutil.which(argv[0])
        if exe is None:
            raise TunesmithError(f"'{argv[0]}' is not installed here",
                                 hint="pip install vllm on a machine with a supported GPU; --dry-run prints the command")
        env = dict(os.environ)
        if spec.api_key:
            env["VLLM_API_KEY"] = spec.api_key  # not on the command line, where ps shows it
        click.echo("starting: " + " ".join(argv), err=True)
        os.execve(exe, argv, env)

    # -- the checks ------------------------------------------------------------------
    def _plan(self, spec: Any, options: VllmOptions) -> dict:
        from tunesmith.core.errors import TunesmithError
        from tunesmith.serving.server import resolve_adapter, resolve_base

        problems: list[str] = []
        if spec.registry:
            problems.append("--registry: the vllm engine does not route registry versions; pass them as --adapter NAME=PATH")
        base_ref = str(spec.base)
        base_dir: Path | None = None
        try:
            base_dir = resolve_base(spec.base, spec.registries)
            base_ref = str(base_dir.resolve())
        except TunesmithError as exc:
            looks_like_hub_id = "/" in base_ref and not Path(base_ref).expanduser().exists()
            if not looks_like_hub_id:
                problems.append(f"base: {exc}")
        modules = _base_modules(base_dir) if base_dir is not None else None
        if modules is None and not problems:
            click.echo(f"warning: base {base_ref} is not a local model folder; target modules are checked by vLLM only",
                       err=True)
        adapters: dict[str, str] = {}
        ranks: dict[str, int] = {}
        for name, path in spec.adapters.items():
            try:
                folder = resolve_adapter(path)
            except TunesmithError as exc:
                problems.append(f"adapter '{name}': {exc}")
                continue
            why, rank = adapter_problems(folder, modules)
            problems += [f"adapter '{name}': {w}" for w in why]
            adapters[name] = str(folder.resolve())
            ranks[name] = rank
        if options.max_lora_rank is not None:
            limit = options.max_lora_rank
            problems += [f"adapter '{n}': LoRA rank {r} is greater than --max-lora-rank {limit}"
                         for n, r in ranks.items() if r > limit]
        else:
            top = max(ranks.values(), default=0)
            fitting = [r for r in VLLM_LORA_RANKS if r >= top]
            if not fitting:
                problems += [f"adapter '{n}': LoRA rank {r} is above vLLM's largest --max-lora-rank {VLLM_LORA_RANKS[-1]}"
                             for n, r in ranks.items() if r > VLLM_LORA_RANKS[-1]]
            limit = fitting[0] if fitting else VLLM_LORA_RANKS[-1]
        return {"problems": problems, "base": base_ref, "adapters": adapters, "max_lora_rank": limit}


def adapter_problems(folder: Path, modules: dict[str, tuple] | None) -> tuple[list[str], int]:
    """Why vLLM cannot serve the PEFT adapter in ``folder`` (and its largest rank).

    ``modules``: the base model's ``{module path: (kind, in_features, out_features)}``
    (see :func:`_base_modules`), or None to skip the checks against the base.
    """
    cfg = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    why: list[str] = []
    ptype = str(cfg.get("peft_type", "?"))
    if ptype != "LORA":
        return [f"{ptype} adapters are not supported by vLLM (LoRA only)"], 0
    if cfg.get("use_dora"):
        why.append("DoRA (use_dora) is not supported by vLLM")
    if cfg.get("modules_to_save"):
        why.append(f"modules_to_save ({', '.join(cfg['modules_to_save'])}) is not supported by vLLM: it loads LoRA A/B"
                   " weights only, so the fully trained modules would be dropped")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        why.append("trained biases (bias / lora_bias) are not supported by vLLM")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        why.append("per-module ranks or alphas (rank_pattern / alpha_pattern) are not supported by vLLM: it scales every"
                   " module by one lora_alpha / r")
    if cfg.get("target_parameters"):
        why.append("LoRA on parameters (target_parameters) is not supported by vLLM")
    if cfg.get("layer_replication"):
        why.append("layer_replication is not supported by vLLM")
    rank = int(cfg.get("r") or 0)
    weights = folder / "adapter_model.safetensors"
    from safetensors import safe_open

    shapes: dict[str, list[int]] = {}
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            shapes[key] = list(f.get_slice(key).get_shape())
    bad_keys = sorted({_module_of(k)[0] for k in shapes if _module_of(k)[1] is None})
    if bad_keys and not cfg.get("modules_to_save"):
        why.append(f"weights that are not LoRA A/B matrices ({', '.join(bad_keys[:3])}"
                   f"{', ...' if len(bad_keys) > 3 else ''}) are not loaded by vLLM")
    targets: dict[str, dict[str, list[int]]] = {}
    for key, shape in shapes.items():
        mod, part = _module_of(key)
        if part in ("lora_embedding_A", "lora_embedding_B"):
            why.append(f"LoRA on the embedding '{mod}' is not supported by vLLM")
            continue
        if part in ("lora_A", "lora_B"):
            targets.setdefault(mod, {})[part] = shape
    for mod, parts in targets.items():
        if "lora_A" in parts:
            rank = max(rank, parts["lora_A"][0])
    if modules is not None:
        seen: set[str] = set()
        for mod, parts in sorted(targets.items()):
            leaf = mod.rsplit(".", 1)[-1]
            found = modules.get(mod)
            if found is None:
                msg = f"target module '{leaf}' ({mod}) does not exist in the base model (trained on another model?)"
            elif found[0] in ("embedding", "lm_head"):
                msg = f"LoRA on '{leaf}' ({found[0]}) is not supported by vLLM (linear layers only)"
            elif found[0] != "linear":
                msg = f"target module '{leaf}' is a {found[0]}, not a linear layer; vLLM applies LoRA to linear layers only"
            else:
                a, b = parts.get("lora_A"), parts.get("lora_B")
                if a is None or b is None:
                    msg = f"target module '{leaf}' has only one of lora_A / lora_B"
                elif a[1] != found[1] or b[0] != found[2]:
                    msg = (f"target module '{leaf}' has LoRA shapes {a} / {b}, the base layer is {found[1]} -> {found[2]}"
                           " (trained on another model?)")
                else:
                    continue
            if msg not in seen:
                seen.add(msg)
                why.append(msg)
    return why, rank


def _module_of(key: str) -> tuple[str, str | None]:
    """``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` ->
    ``("model.layers.0.self_attn.q_proj", "lora_A")``; part None for non-LoRA weights."""
    k = key.removeprefix("base_model.model.")
    parts = k.split(".")
    for i, p in enumerate(parts):
        if p in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"):
            return ".".join(parts[:i]), p
    return k.rsplit(".", 1)[0], None


def _base_modules(base_dir: Path) -> dict[str, tuple] | None:
    """``{module path: (kind, in_features, out_features)}`` of the base model, built on
    the meta device (no weights read). None when transformers cannot build it."""
    try:
        import torch
        from torch import nn
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.from_pretrained(str(base_dir), trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - an exotic model: vLLM checks it itself
        click.echo(f"warning: cannot build {base_dir} to check target modules: {exc}", err=True)
        return None
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    out: dict[str, tuple] = {}
    for name, mod in model.named_modules():
        if mod is emb:
            out[name] = ("embedding", None, None)
        elif mod is head:
            out[name] = ("lm_head", None, None)
        elif isinstance(mod, nn.Linear):
            out[name] = ("linear", mod.in_features, mod.out_features)
        elif isinstance(mod, nn.Embedding):
            out[name] = ("embedding", None, None)
        else:
            out[name] = (type(mod).__name__, None, None)
    return out


@hookimpl
def register_serving_engines(register: Any) -> None:
    register(VllmEngine())
