"""The export driver and what the exporters share.

:func:`export_run` is the one entry point the CLI and the pipeline use::

    export_run(run_dir, "merged", output=None, overwrite=False, registries=regs, options={"dtype": "float32"})

It finds the exporter plugin, validates its options, refuses an existing output
unless ``overwrite`` and calls the ``after_export`` lifecycle hook.

The helpers below read a finished run (``final/`` with ``tunesmith.json``), load
the adapter on its base (4-bit base for QLoRA), dequantise a 4-bit base into a
higher-precision copy, merge, and compare logits. Plugins use them; nothing here
imports a plugin.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.core.errors import TunesmithError
from tunesmith.core.registry import member

INFO_FILE = "tunesmith.json"
#: written beside every exported artefact: what it came from and how it was checked
MANIFEST = "tunesmith_export.json"
#: files a PEFT adapter folder may carry besides the adapter itself
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "generation_config.json",
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
#: prompts used to compare logits after an export
CHECK_TEXTS = (
    "The capital of France is",
    "<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n<|im_start|>assistant\n",
)


# --------------------------------------------------------------------------- the driver
def default_output(run_dir: str | Path, fmt: str, options: Any = None, *, registries: Any = None) -> Path:
    """Where ``fmt`` goes when no output is given: ``RUN/exports/<format>`` (or the
    exporter's own ``default_output(run_dir, options)``)."""
    regs = _regs(registries)
    exporter = regs.exporters.get(fmt)
    fn = member(exporter, "exporters", "default_output")
    if callable(fn):
        return Path(fn(Path(run_dir), options))
    return Path(run_dir) / "exports" / fmt


def validate_options(exporter: Any, options: Any, *, overwrite: bool | None = None) -> Any:
    """The exporter's ``Options`` from a dict / model / None, with ``overwrite`` applied."""
    from pydantic import BaseModel, ValidationError

    model = getattr(exporter, "Options", None)
    if model is None:
        return options
    if isinstance(options, BaseModel) and not isinstance(options, model):
        options = options.model_dump()
    if options is None:
        options = {}
    if isinstance(options, dict):
        data = dict(options)
        data.pop("format", None)
        try:
            options = model.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise TunesmithError(f"export '{exporter.name}': {where}: {err['msg']}") from None
    if overwrite is not None and "overwrite" in type(options).model_fields:
        options = options.model_copy(update={"overwrite": bool(overwrite) or bool(getattr(options, "overwrite", False))})
    return options


def export_run(
    run_dir: str | Path,
    fmt: str,
    output: str | Path | None = None,
    *,
    overwrite: bool = False,
    registries: Any = None,
    options: Any = None,
    context: Any = None,
) -> Path:
    """Export a finished run with the exporter plugin ``fmt``; returns the artefact's path.

    ``run_dir`` is a run directory (or its ``final/`` folder); ``output`` defaults to
    ``RUN/exports/<fmt>`` (GGUF: ``RUN/exports/gguf/model-<type>.gguf``); an existing
    output is refused unless ``overwrite``. ``options`` is the exporter's options as a
    dict (the config's ``export: [{format: ..., ...}]`` entry) or its Options model.
    """
    from tunesmith.core.context import RunContext

    regs = _regs(registries)
    exporter = regs.exporters.get(fmt)
    opts = validate_options(exporter, options, overwrite=overwrite)
    run = run_root(run_dir)
    out = Path(output) if output is not None else default_output(run, fmt, opts, registries=regs)
    out = out.expanduser()
    resolve = member(exporter, "exporters", "resolve_output")
    if callable(resolve):  # e.g. GGUF: a folder means <folder>/model-<type>.gguf
        out = Path(resolve(out, opts))
    if out.exists() and not (overwrite or getattr(opts, "overwrite", False)):
        raise TunesmithError(f"{out} already exists", hint="pass --overwrite to replace it")
    ctx = context or RunContext(run_dir=run, registries=regs)
    path = Path(exporter.export(run, out, opts, ctx))
    with contextlib.suppress(Exception):  # a failing observer must not undo a finished export
        if getattr(ctx, "registries", None) is None:
            ctx.registries = regs
        ctx.emit("after_export", exporter=fmt, path=path)
    return path


def _regs(registries: Any) -> Any:
    if registries is not None:
        return registries
    from tunesmith.core.plugins import get_registries

    return get_registries()


# --------------------------------------------------------------------------- reading a run
@dataclass
class TrainedRun:
    """What a finished run's ``final/`` holds."""

    root: Path
    final_dir: Path
    info: dict = field(default_factory=dict)

    @property
    def method(self) -> str:
        return str((self.info.get("peft") or {}).get("method") or ("full" if self.is_full_model else "lora"))

    @property
    def method_options(self) -> dict:
        return dict((self.info.get("peft") or {}).get("options") or {})

    @property
    def is_peft_adapter(self) -> bool:
        return (self.final_dir / "adapter_config.json").exists()

    @property
    def is_full_model(self) -> bool:
        return not self.is_peft_adapter and (self.final_dir / "config.json").exists()

    @property
    def adapter_config(self) -> dict:
        p = self.final_dir / "adapter_config.json"
        return json.loads(p.read_text(encoding="utf-8")) if p.exists() else {}

    @property
    def peft_type(self) -> str | None:
        return self.adapter_config.get("peft_type")

    @property
    def quantized(self) -> bool:
        """Trained on a 4-bit base (QLoRA)."""
        q = self.info.get("quantization")
        if isinstance(q, dict) and q:
            return True
        if bool(self.method_options.get("load_in_4bit")):
            return True
        with contextlib.suppress(Exception):  # the method says so: it loads its base quantised
            return member(_regs(None).peft_methods.get(self.method), "peft_methods", "quantization_config") is not None
        return False

    def method_plugin_options(self, plugin: Any) -> Any:
        """The PEFT method's options as trained, validated by the plugin's ``Options``."""
        opts_model = getattr(plugin, "Options", None)
        return opts_model.model_validate(self.method_options) if opts_model is not None else None

    def base_model_dir(self, registries: Any = None) -> Path:
        """The base model's folder: ``base_model_dir`` of tunesmith.json, else its
        ``model`` section resolved by the model-source plugin, else the adapter's
        ``base_model_name_or_path`` when that is a local folder."""
        cand = self.info.get("base_model_dir")
        if cand and (Path(cand) / "config.json").exists():
            return Path(cand)
        if self.info.get("model"):
            from tunesmith.core.config import ModelSection
            from tunesmith.core.models import resolve_model_dir

            section = ModelSection.model_validate(self.info["model"])
            return resolve_model_dir(section, _regs(registries))
        cand = self.adapter_config.get("base_model_name_or_path")
        if cand and (Path(cand) / "config.json").exists():
            return Path(cand)
        raise TunesmithError(
            f"{self.final_dir}: cannot find the base model",
            hint=f"{INFO_FILE} needs base_model_dir or model, or adapter_config.json a local base_model_name_or_path",
        )

    def tokenizer_dir(self, registries: Any = None) -> Path:
        if (self.final_dir / "tokenizer_config.json").exists() or (self.final_dir / "tokenizer.json").exists():
            return self.final_dir
        return self.base_model_dir(registries)

    def bnb_config(self, registries: Any = None) -> Any:
        """The BitsAndBytesConfig the run trained with: the PEFT plugin's own
        ``quantization_config(options)`` when it has one, else from tunesmith.json
        (NF4, double quantisation, float32 compute on CPU by default)."""
        import torch
        from transformers import BitsAndBytesConfig

        q = dict(self.info.get("quantization") or {})
        if not q:
            with contextlib.suppress(Exception):
                plugin = _regs(registries).peft_methods.get(self.method)
                quantization_config = member(plugin, "peft_methods", "quantization_config")
                if quantization_config is not None:
                    return quantization_config(self.method_plugin_options(plugin))
        o = self.method_options
        pick = lambda *keys, default=None: next((d[k] for d in (q, o) for k in keys if k in d), default)  # noqa: E731
        dtype = pick("bnb_4bit_compute_dtype", "compute_dtype", default="auto")
        if dtype == "auto":
            dtype = "bfloat16" if torch.cuda.is_available() else "float32"
        dtype = getattr(torch, str(dtype).replace("torch.", "")) if isinstance(dtype, str) else dtype
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=pick("bnb_4bit_quant_type", "quant_type", default="nf4"),
            bnb_4bit_use_double_quant=bool(pick("bnb_4bit_use_double_quant", "double_quant", default=True)),
            bnb_4bit_compute_dtype=dtype,
        )


def run_root(path: str | Path) -> Path:
    """The run directory of a run dir or its ``final/`` folder."""
    p = Path(path).expanduser()
    if p.name == "final" and (p / INFO_FILE).exists():
        return p.parent
    return p


def read_run(path: str | Path) -> TrainedRun:
    """The finished run at ``path`` (a run directory or a ``final/`` folder)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise TunesmithError(f"{p} does not exist")
    for final in (p / "final", p):
        if (final / INFO_FILE).exists() or (final / "adapter_config.json").exists():
            info_path = final / INFO_FILE
            info = {}
            if info_path.exists():
                try:
                    info = json.loads(info_path.read_text(encoding="utf-8"))
                except json.JSONDecodeError as exc:
                    raise TunesmithError(f"{info_path}: not valid JSON (line {exc.lineno}): {exc.msg}") from None
            return TrainedRun(root=final.parent if final.name == "final" else final, final_dir=final, info=info)
    raise TunesmithError(
        f"{p} holds no finished run", hint=f"expected {p}/final/{INFO_FILE} (train first) or a PEFT adapter folder"
    )


# --------------------------------------------------------------------------- loading
def load_tokenizer(run: TrainedRun, registries: Any = None) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(run.tokenizer_dir(registries)), trust_remote_code=False)


def load_base(run: TrainedRun, *, dtype: Any = None, quantized: bool | None = None, registries: Any = None) -> Any:
    """The run's base model (4-bit when the run trained on a 4-bit base and ``quantized`` is not False)."""
    import torch
    from transformers import AutoModelForCausalLM

    quantized = run.quantized if quantized is None else quantized
    kwargs: dict[str, Any] = {"trust_remote_code": False, "dtype": dtype or torch.float32}
    if quantized:
        kwargs["quantization_config"] = run.bnb_config(registries)
    model = AutoModelForCausalLM.from_pretrained(str(run.base_model_dir(registries)), **kwargs)
    if run.adapter_config.get("trainable_token_indices"):  # the chat template added tokens: grow the base to them
        from tunesmith.core.models import fit_embeddings

        fit_embeddings(model, load_tokenizer(run, registries))
    return model


def load_adapter_model(run: TrainedRun, *, dtype: Any = None, registries: Any = None, base: Any = None) -> Any:
    """Base + adapter with plain peft (4-bit base for QLoRA runs), in eval mode."""
    from peft import PeftModel

    if base is None:
        base = load_base(run, dtype=dtype, registries=registries)
    model = PeftModel.from_pretrained(base, str(run.final_dir), is_trainable=False)
    return model.eval()


def dequantize_4bit_(model: Any) -> Any:
    """Replace every bitsandbytes 4-bit linear layer by a float32 ``nn.Linear`` that
    computes what the 4-bit layer computes (in place; returns the model).

    The weights are read by probing each layer with the identity matrix, which is
    exact with respect to the layer's own kernel and independent of how the 4-bit
    weights are packed (bitsandbytes repacks them on CPU, which makes its
    ``dequantize_4bit`` of the stored data wrong there).
    """
    import torch

    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover - nothing can be 4-bit then
        return model
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, bnb.nn.Linear4bit)]
    with torch.no_grad():
        for parent, name, child in targets:
            n_in = child.in_features
            cols = []
            for start in range(0, n_in, 1024):
                eye = torch.zeros(min(1024, n_in - start), n_in, dtype=torch.float32)
                eye[:, start : start + eye.shape[0]] = torch.eye(eye.shape[0])
                out = child(eye.to(child.compute_dtype or torch.float32)).float()
                if child.bias is not None:
                    out = out - child.bias.float()
                cols.append(out)
            weight = torch.cat(cols, dim=0).T.contiguous()
            new = torch.nn.Linear(n_in, child.out_features, bias=child.bias is not None, dtype=torch.float32)
            new.weight.copy_(weight)
            if child.bias is not None:
                new.bias.copy_(child.bias.float())
            setattr(parent, name, new)
    # the model is no longer quantised: drop the markers so save_pretrained writes plain weights
    for attr in ("quantization_config",):
        if hasattr(model.config, attr):
            with contextlib.suppress(Exception):
                delattr(model.config, attr)
    for attr in ("is_quantized", "is_loaded_in_4bit"):
        with contextlib.suppress(Exception):
            setattr(model, attr, False)
    with contextlib.suppress(Exception):
        model.hf_quantizer = None
    return model


def method_plugin(run: TrainedRun, registries: Any = None) -> Any:
    """The run's PEFT method plugin (a clear error when it is not installed)."""
    try:
        return _regs(registries).peft_methods.get(run.method)
    except TunesmithError as exc:
        raise TunesmithError(
            f"{run.final_dir} was trained with the PEFT method '{run.method}', which is not installed: {exc}",
            hint="install the plugin package that provides it",
        ) from None


def check_mergeable(run: TrainedRun, registries: Any = None) -> None:
    """Raise a clear error when the run's method cannot be merged into the base weights:
    the method plugin says whether it merges (``mergeable``) and does it (``merge``)."""
    if run.is_full_model:
        return
    plugin = method_plugin(run, registries)
    if not member(plugin, "peft_methods", "mergeable") or member(plugin, "peft_methods", "merge") is None:
        raise TunesmithError(
            f"the PEFT method '{run.method}' cannot be merged into the base weights ({plugin.description})",
            hint="export it with --format adapter and serve it on the base model",
        )


def load_with_method(run: TrainedRun, base: Any, registries: Any = None) -> Any:
    """Base + the run's trained weights through the method plugin's own ``load``."""
    plugin = method_plugin(run, registries)
    return plugin.load(base, run.final_dir, run.method_plugin_options(plugin)).eval()


@dataclass
class Merged:
    model: Any
    tokenizer: Any
    reference_logits: Any = None
    check: dict = field(default_factory=dict)


def merge_run(
    run: TrainedRun,
    *,
    registries: Any = None,
    check: bool = True,
    qlora_base: str = "dequantized",
) -> Merged:
    """The run's adapter merged into a float32 copy of its base (``merge_and_unload``).

    With ``check`` the adapter model's logits on :data:`CHECK_TEXTS` are kept as
    ``reference_logits`` (for QLoRA: adapter on the 4-bit base, exactly what was
    trained) and compared with the merged model's. For QLoRA the merge goes into a
    dequantised float32 copy of the 4-bit base (``qlora_base="dequantized"``) or into
    the original base weights (``"original"``); never into 4-bit weights.
    """
    import torch

    tok = load_tokenizer(run, registries)
    if run.is_full_model:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(run.final_dir), dtype=torch.float32, trust_remote_code=False)
        return Merged(model.eval(), tok, None, {"merged": False, "reason": "full model: nothing to merge"})
    check_mergeable(run, registries)
    plugin = method_plugin(run, registries)
    ref = None
    if run.quantized:
        if check:
            ref_model = load_with_method(run, load_base(run, registries=registries), registries)
            ref = logits_for(ref_model, tok)
            del ref_model
        base = load_base(run, registries=registries, quantized=qlora_base == "dequantized")
        if qlora_base == "dequantized":
            base = dequantize_4bit_(base)
        model = load_with_method(run, base, registries)
    else:
        model = load_with_method(run, load_base(run, dtype=torch.float32, registries=registries), registries)
        if check:
            ref = logits_for(model, tok)
    merged = clean_copy(plugin.merge(model))
    info: dict[str, Any] = {"merged": True, "peft_type": run.peft_type, "quantized_base": run.quantized}
    if run.quantized:
        info["qlora_base"] = qlora_base
    if ref is not None:
        got = logits_for(merged, tok)
        info["max_abs_logit_diff"] = float((got - ref).abs().max())
        info["reference"] = "adapter on the 4-bit base" if run.quantized else "adapter on the base"
    return Merged(merged.eval(), tok, ref, info)


def clean_copy(model: Any) -> Any:
    """The model rebuilt from its config without quantisation leftovers (weights shared)."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = model.config.to_dict()
    for k in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        cfg.pop(k, None)
    config = type(model.config).from_dict(cfg)
    with torch.device("meta"):
        dst = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    dst.load_state_dict(state, assign=True, strict=False)
    dst.tie_weights()
    src_buffers = dict(model.named_buffers())
    for name, buf in list(dst.named_buffers()):
        if buf.is_meta and name in src_buffers:  # non-persistent buffers (rotary inv_freq)
            mod_name, _, attr = name.rpartition(".")
            mod = dst.get_submodule(mod_name) if mod_name else dst
            mod._buffers[attr] = src_buffers[name].detach().clone()
    missing = [n for n, p in list(dst.named_parameters()) + list(dst.named_buffers()) if p.is_meta]
    if missing:
        raise TunesmithError(f"merge lost weights: {missing[:3]}")
    if getattr(model, "generation_config", None) is not None:
        dst.generation_config = model.generation_config
    return dst.eval()


def logits_for(model: Any, tokenizer: Any, texts: tuple[str, ...] | list[str] = CHECK_TEXTS) -> Any:
    """Float32 logits of ``texts`` (concatenated along the sequence axis, unpadded)."""
    import torch

    outs = []
    with torch.no_grad():
        for t in texts:
            ids = tokenizer(t, return_tensors="pt", add_special_tokens=False)["input_ids"]
            outs.append(model(input_ids=ids).logits[0].float())
    return torch.cat(outs, dim=0)


# --------------------------------------------------------------------------- writing
def refuse_pickles(folder: Path) -> None:
    bad = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if bad:
        raise TunesmithError(f"{folder} holds pickled files ({', '.join(bad)}); tunesmith exports safetensors only")


def copy_files(src: Path, dst: Path, names: tuple[str, ...] | list[str]) -> list[str]:
    copied = []
    for n in names:
        if (src / n).is_file():
            shutil.copy2(src / n, dst / n)
            copied.append(n)
    return copied


def manifest(run: TrainedRun, fmt: str, **extra: Any) -> dict:
    import datetime as _dt

    from tunesmith import __version__

    return {
        "format": fmt,
        "run": str(run.root),
        "method": run.method,
        "peft_type": run.peft_type,
        "base_model_dir": str(run.info.get("base_model_dir", "")),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tunesmith_version": __version__,
        **extra,
    }
