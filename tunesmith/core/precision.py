"""Hardware detection and the precision decision (``training.precision``).

``precision: auto`` chooses bf16 compute where the hardware multiplies bf16
natively and fp32 elsewhere:

* CUDA: bf16 on Ampere or newer (compute capability >= 8.0), fp16 (with loss
  scaling) on older GPUs;
* CPU: bf16 where the CPU has AMX (``amx_bf16``) or AVX-512 BF16
  (``avx512_bf16``, e.g. Intel Sapphire Rapids+, AMD Zen 4+) and the model's
  matrices are large enough to gain (hidden size >= :data:`MIN_CPU_BF16_HIDDEN`):
  below that a step is framework overhead and element-wise work, and bf16 only
  adds casts (measured: docs/training.md). Full fine-tuning (every weight trained)
  and quantised bases (QLoRA) stay fp32 on CPU: there is no frozen base to store
  in bf16, and casting trained fp32 weights every step gains nothing;
* anything else: fp32.

What bf16 compute means (``bf16``, or ``auto`` choosing it): the frozen base is
*stored* in bf16 (loaded so, never cast per step); trainable parameters (LoRA
A/B, adapters, unfrozen blocks) stay fp32, so do their gradients and the optimiser
state; matmuls run in bf16 under autocast; the output head's logits at the
labelled positions are upcast to fp32 before the cross-entropy, so the loss
reduction is fp32.

:func:`resolve_precision` is the one place that decides; it says which in one
line (once per run), e.g.
``precision auto: bf16 (CPU with AVX-512 BF16: native bf16 matmul) - frozen base stored in bf16, trainable parameters fp32``.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: below this hidden size a CPU step is overhead-bound and bf16 does not pay
MIN_CPU_BF16_HIDDEN = 256


# --------------------------------------------------------------------------- hardware
@dataclass(frozen=True)
class Hardware:
    """What the precision and compile decisions need to know about the machine."""

    device: str  # "cuda" or "cpu"
    name: str
    native_bf16: bool
    bf16_unit: str | None = None  # "AMX", "AVX-512 BF16", "sm_80", ...
    capability: tuple[int, int] | None = None  # CUDA compute capability
    features: tuple[str, ...] = field(default_factory=tuple)

    def describe(self) -> str:
        if self.device == "cuda":
            cc = f"sm_{self.capability[0]}{self.capability[1]}" if self.capability else "?"
            return f"{self.name} ({cc})"
        return f"CPU with {self.bf16_unit}" if self.bf16_unit else "CPU without bf16 matmul units"


def cpuinfo_flags(text: str | None = None) -> set[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (or of ``text``); empty where unreadable."""
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_bf16_unit(flags: set[str] | None = None) -> str | None:
    """``"AMX"``, ``"AVX-512 BF16"`` or None: the CPU's native bf16 matmul unit.

    torch's own probes (``torch.cpu._is_amx_tile_supported`` and
    ``_is_avx512_bf16_supported``, which also check that the OS enabled the AMX
    tile state) win; ``/proc/cpuinfo`` is the fallback for builds without them.
    ``flags`` (tests) skips torch's probes.
    """
    if flags is None:
        try:
            import torch

            probe = getattr(torch, "cpu", None)
            amx = getattr(probe, "_is_amx_tile_supported", None)
            avx = getattr(probe, "_is_avx512_bf16_supported", None)
            if amx is not None and avx is not None:
                if amx() and "amx_bf16" in cpuinfo_flags():
                    return "AMX"
                return "AVX-512 BF16" if avx() else None
        except Exception:  # noqa: BLE001 - fall back to the flags
            pass
        flags = cpuinfo_flags()
    if "amx_bf16" in flags and "amx_tile" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX-512 BF16"
    return None


@functools.lru_cache(maxsize=1)
def detect_hardware() -> Hardware:
    """The machine training runs on (cached: it does not change within a process)."""
    import torch

    if torch.cuda.is_available():
        cc = torch.cuda.get_device_capability()
        name = torch.cuda.get_device_name()
        native = cc[0] >= 8 and bool(torch.cuda.is_bf16_supported())
        return Hardware("cuda", name, native, bf16_unit=f"sm_{cc[0]}{cc[1]}" if native else None, capability=tuple(cc))
    flags = cpuinfo_flags()
    unit = cpu_bf16_unit()
    keep = tuple(sorted(f for f in flags if f.startswith(("amx", "avx512_bf16", "avx512f"))))
    return Hardware("cpu", "CPU", unit is not None, bf16_unit=unit, features=keep)


# --------------------------------------------------------------------------- the decision
@dataclass(frozen=True)
class PrecisionChoice:
    """The resolved ``training.precision``."""

    requested: str  # auto | fp32 | bf16 | fp16
    compute: str  # fp32 | bf16 | fp16
    device: str  # cpu | cuda
    reason: str
    store_base_bf16: bool = False  # frozen base weights stored in bf16, trainable ones fp32

    @property
    def bf16(self) -> bool:
        return self.compute == "bf16"

    def trainer_flags(self) -> dict:
        """``bf16``/``fp16``/``use_cpu`` for ``TrainingArguments`` (autocast)."""
        return {"bf16": self.compute == "bf16", "fp16": self.compute == "fp16", "use_cpu": self.device != "cuda"}

    def line(self) -> str:
        what = {"bf16": "bf16", "fp16": "fp16 (loss scaling)", "fp32": "fp32"}[self.compute]
        storage = ""
        if self.store_base_bf16:
            storage = " - frozen base stored in bf16, trainable parameters and optimiser state fp32"
        elif self.compute == "bf16":
            storage = " - fp32 weights, bf16 autocast"
        return f"precision {self.requested}: {what} ({self.reason}){storage}"


def choose_precision(
    requested: str,
    *,
    hardware: Hardware | None = None,
    hidden_size: int | None = None,
    full_model: bool = False,
    quantized: bool = False,
) -> PrecisionChoice:
    """The precision for ``requested`` on ``hardware`` (default: this machine).

    ``hidden_size`` is the model's (None: unknown, taken as large enough),
    ``full_model`` says every weight is trained (full fine-tuning), ``quantized``
    that the base is quantised (QLoRA). See the module docstring for the rules.
    """
    from tunesmith.core.errors import ConfigError

    hw = hardware or detect_hardware()
    frozen_base = not full_model and not quantized
    if requested == "fp32":
        return PrecisionChoice("fp32", "fp32", hw.device, "asked for")
    if requested == "fp16":
        if hw.device != "cuda":
            raise ConfigError("fp16 needs a CUDA GPU; use precision: fp32 or bf16 on CPU", key="training.precision")
        return PrecisionChoice("fp16", "fp16", hw.device, "asked for")
    if requested == "bf16":
        why = f"asked for; {hw.describe()}" + ("" if hw.native_bf16 else ", emulated: slower than fp32 here")
        return PrecisionChoice("bf16", "bf16", hw.device, why, store_base_bf16=frozen_base)
    if requested != "auto":
        raise ConfigError(f"unknown precision '{requested}' (auto, fp32, bf16, fp16)", key="training.precision")
    if hw.device == "cuda":
        if hw.native_bf16:
            return PrecisionChoice("auto", "bf16", "cuda", f"{hw.describe()}: native bf16", store_base_bf16=frozen_base)
        return PrecisionChoice("auto", "fp16", "cuda", f"{hw.describe()}: no bf16 tensor cores (before Ampere)")
    if not hw.native_bf16:
        return PrecisionChoice("auto", "fp32", "cpu", f"{hw.describe()}")
    if full_model:
        return PrecisionChoice("auto", "fp32", "cpu", f"{hw.describe()}, but full fine-tuning: no frozen base to store in bf16")
    if quantized:
        return PrecisionChoice("auto", "fp32", "cpu", f"{hw.describe()}, but a quantised base")
    if hidden_size is not None and hidden_size < MIN_CPU_BF16_HIDDEN:
        return PrecisionChoice("auto", "fp32", "cpu",
                               f"{hw.describe()}, but hidden size {hidden_size} < {MIN_CPU_BF16_HIDDEN}: too small to gain")
    return PrecisionChoice("auto", "bf16", "cpu", f"{hw.describe()}: native bf16 matmul", store_base_bf16=True)


def model_hidden_size(model_dir: str | Path | None) -> int | None:
    """``hidden_size`` (or ``d_model``/``n_embd``) of a model folder's config.json."""
    if model_dir is None:
        return None
    path = Path(model_dir) / "config.json"
    try:
        conf = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    conf = conf.get("text_config", conf) if isinstance(conf.get("text_config"), dict) else conf
    for key in ("hidden_size", "d_model", "n_embd"):
        if isinstance(conf.get(key), int):
            return int(conf[key])
    return None


_SAID: set[tuple] = set()


def resolve_precision(cfg: Any, registries: Any = None, *, model_dir: str | Path | None = None, quiet: bool = False) -> PrecisionChoice:
    """The run's precision from ``cfg.training.precision``, its PEFT method and the
    base model's size; prints the decision once per config and process."""
    from tunesmith.core.registry import member

    requested = cfg.training.precision
    full_model = quantized = False
    hidden = None
    method = None
    try:
        if registries is None:
            from tunesmith.core.plugins import get_registries

            registries = get_registries()
        method = registries.peft_methods.get(cfg.peft.method)
    except Exception:  # noqa: BLE001 - unknown method: the session reports it
        method = None
    if method is not None:
        full_model = bool(member(method, "peft_methods", "saves_full_model")) and method.name == "full"
        quantized = member(method, "peft_methods", "quantization_config") is not None
    if requested == "auto" and detect_hardware().device == "cpu" and detect_hardware().native_bf16:
        if model_dir is None:
            try:
                from tunesmith.core.models import resolve_model_dir

                model_dir = resolve_model_dir(cfg, registries)
            except Exception:  # noqa: BLE001 - size unknown: treated as large
                model_dir = None
        hidden = model_hidden_size(model_dir)
    choice = choose_precision(requested, hidden_size=hidden, full_model=full_model, quantized=quantized)
    key = (id(cfg), choice)
    if not quiet and key not in _SAID:
        _SAID.add(key)
        from tunesmith.core.ranks import say

        say(choice.line())
    return choice


def cast_trainable_fp32(model: Any) -> int:
    """Trainable floating-point parameters to fp32 in place (the frozen ones keep
    their storage dtype); returns how many were cast."""
    import torch

    n = 0
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
            n += 1
    return n


def env_flag(name: str) -> bool | None:
    """``1/true/on`` -> True, ``0/false/off`` -> False, unset -> None."""
    v = os.environ.get(name)
    if v is None:
        return None
    return v.strip().lower() in ("1", "true", "on", "yes")


# --------------------------------------------------------------------------- attention on a bf16 CPU
def _fp32_sdpa(original: Any) -> Any:
    """transformers' ``sdpa`` attention with bf16/fp16 CPU inputs upcast to fp32.

    torch's CPU flash-attention kernel is slower in bf16 than in fp32 (measured at
    the default model's shapes, forward + backward: 7.8 ms bf16 against 2.6 ms
    fp32 with the casts); the upcast result is also closer to an fp32 run
    (the error is the inputs' rounding only). The math backend would be as fast
    at short lengths but materialises the attention matrix (memory quadratic in
    the sequence length), so it is not used.
    """
    import torch

    def attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, *args: Any, **kwargs: Any) -> Any:
        if query.device.type != "cpu" or query.dtype not in (torch.bfloat16, torch.float16):
            return original(module, query, key, value, attention_mask, *args, **kwargs)
        dtype = query.dtype
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.float()
        with torch.autocast("cpu", enabled=False):  # CPU autocast would cast the inputs back to bf16
            out, weights = original(module, query.float(), key.float(), value.float(), attention_mask, *args, **kwargs)
        return out.to(dtype), weights

    return attention


class cpu_attention_in_fp32:
    """Context manager: while active, transformers' ``sdpa`` attention computes in fp32
    for bf16/fp16 tensors on the CPU (see :func:`_fp32_sdpa`); the training step of a
    bf16 run on CPU enters it. Re-entrant; other attention implementations and
    devices are untouched."""

    _depth = 0
    _saved: Any = None

    def __enter__(self) -> "cpu_attention_in_fp32":
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        cls = type(self)
        if cls._depth == 0:
            local = ALL_ATTENTION_FUNCTIONS._local_mapping
            cls._saved = local.get("sdpa")
            ALL_ATTENTION_FUNCTIONS["sdpa"] = _fp32_sdpa(ALL_ATTENTION_FUNCTIONS["sdpa"])
        cls._depth += 1
        return self

    def __exit__(self, *exc: Any) -> None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        cls = type(self)
        cls._depth -= 1
        if cls._depth == 0:
            if cls._saved is None:
                ALL_ATTENTION_FUNCTIONS._local_mapping.pop("sdpa", None)
            else:
                ALL_ATTENTION_FUNCTIONS["sdpa"] = cls._saved
            cls._saved = None
