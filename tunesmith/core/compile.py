"""``training.compile``: torch.compile of the model's repeated blocks.

* **What is compiled**: each block of the model's largest list of identical blocks
  (the decoder layers), in place (``module.compile``), with dynamic sequence
  lengths. Regional compilation: the 30 layers of SmolLM2 share one compiled
  graph, so the compile costs one layer's tracing, not the whole model's; the
  output head, the labelled-positions gather and the loss stay eager (their
  shapes are data-dependent). State-dict keys do not change, so checkpoints,
  resume and saving are unaffected.
* **Stable shapes**: the blocks are compiled with ``dynamic=True`` (symbolic batch
  and sequence length), so a new padded length reuses the compiled graph instead of
  recompiling every batch.
* **Paid once**: inductor's FX-graph and AOT-autograd caches live under the user
  cache dir (``~/.cache/tunesmith/inductor``, ``TUNESMITH_CACHE`` moves it) unless
  ``TORCHINDUCTOR_CACHE_DIR`` is set.
* **auto**: compiles only when the run is long enough to amortise the compile:
  ``steps x tokens per step x (eager - compiled seconds per token) > 1.5 x compile
  seconds``. The costs and gains are *measured* by earlier runs of the same model
  shape on this machine (``inductor/tunesmith-compile.json``: each run records its
  steady step time per token and, when compiled, the compile seconds; the fastest
  value seen is kept, since a busy machine only ever measures slower); without a
  record, conservative defaults (:data:`DEFAULT_COMPILE_S`, :data:`DEFAULT_GAIN`),
  the assumed compile seconds scaled by how much slower than the default estimate
  the eager step was measured here.
  A short run (the quickstart's 80 steps) is never compiled.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: assumed compile seconds of the blocks' forward + backward before any is measured
DEFAULT_COMPILE_S = {"cpu": 45.0, "cuda": 60.0}
#: assumed share of an eager step the compiled blocks save, before any is measured
DEFAULT_GAIN = 0.15
#: assumed eager model FLOP/s (training), to estimate a step before any is measured
DEFAULT_EAGER_FLOPS = {"cpu": 2.0e11, "cuda": 5.0e13}
#: auto compiles when the expected saving exceeds the compile cost by this factor
MARGIN = 1.5
RECORD_FILE = "tunesmith-compile.json"


def _user_inductor_dir() -> str | None:
    """``$TORCHINDUCTOR_CACHE_DIR`` as the user set it: torch writes its own default
    (/tmp/torchinductor_USER) into the variable the first time inductor asks for a
    cache, which is not a choice of the user's and must not move the cache to /tmp."""
    value = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not value:
        return None
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        if os.path.abspath(value) == os.path.abspath(default_cache_dir()):
            return None
    except Exception:  # noqa: BLE001 - another torch layout: take the variable as set
        pass
    return value


def inductor_cache_dir() -> Path:
    from tunesmith.core.paths import cache_dir

    return Path(_user_inductor_dir() or (cache_dir() / "inductor"))


def configure_cache() -> Path:
    """Point inductor's persistent caches at the user cache dir; returns the folder."""
    path = inductor_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)  # the user's own value, or ours over torch's default
    try:
        import torch._functorch.config as fconfig
        import torch._inductor.config as iconfig

        iconfig.fx_graph_cache = True
        if hasattr(fconfig, "enable_autograd_cache"):
            fconfig.enable_autograd_cache = True
    except Exception:  # noqa: BLE001 - an old torch: no persistent cache, compile still works
        pass
    return path


def repeated_blocks(model: Any) -> list[Any]:
    """The longest ``nn.ModuleList`` of modules of one class (a transformer's layers)."""
    from torch import nn

    best: list[Any] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 2:
            kinds = {type(m) for m in module}
            if len(kinds) == 1 and len(module) > len(best):
                best = list(module)
    return best


def compile_blocks(model: Any) -> int:
    """Compile the repeated blocks in place (dynamic shapes); returns how many."""
    configure_cache()
    blocks = repeated_blocks(model)
    n = 0
    for block in blocks:
        if getattr(block, "_tunesmith_compiled", False):
            continue
        block.compile(dynamic=True)
        block._tunesmith_compiled = True
        n += 1
    return n


def model_signature(model: Any, device: str, dtype: str) -> str:
    """What a compiled graph depends on: architecture, width, depth, dtype, device,
    trainable layout (which parameters train) and torch version."""
    import torch

    conf = getattr(model, "config", None)
    inner = model
    while conf is None and hasattr(inner, "base_model"):
        inner = inner.base_model
        conf = getattr(inner, "config", None)
    arch = getattr(conf, "model_type", type(model).__name__)
    width = getattr(conf, "hidden_size", None)
    depth = getattr(conf, "num_hidden_layers", None)
    trainable = sum(1 for p in model.parameters() if p.requires_grad)
    return f"{arch}-h{width}-l{depth}-{dtype}-{device}-t{trainable}-torch{torch.__version__}"


def read_records() -> dict:
    try:
        return json.loads((inductor_cache_dir() / RECORD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def write_record(signature: str, **values: float) -> None:
    """Merge ``values`` into the signature's record (atomic; best effort)."""
    from tunesmith.core.io import atomic_write_json

    try:
        records = read_records()
        rec = dict(records.get(signature) or {})
        for k, v in values.items():  # keep the fastest seen: load only ever slows a measurement down
            v = round(float(v), 6)
            rec[k] = min(v, float(rec[k])) if isinstance(rec.get(k), (int, float)) else v
        records[signature] = rec
        path = inductor_cache_dir()
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path / RECORD_FILE, records)
    except Exception:  # noqa: BLE001 - the record only informs later decisions
        pass


@dataclass(frozen=True)
class CompileDecision:
    compile: bool
    reason: str

    def line(self, mode: str) -> str:
        return f"compile {mode}: {'on' if self.compile else 'off'} ({self.reason})"


def decide_compile(mode: str, *, steps: int, tokens_per_step: float, device: str, n_params: int,
                   record: dict | None = None) -> CompileDecision:
    """Whether to compile (see the module docstring for the ``auto`` rule)."""
    if mode == "off":
        return CompileDecision(False, "asked for")
    if mode == "on":
        return CompileDecision(True, "asked for")
    record = record or {}
    measured = "compile_s" in record
    cost = float(record.get("compile_s", DEFAULT_COMPILE_S.get(device, 60.0)))
    estimate = 4.0 * n_params / DEFAULT_EAGER_FLOPS.get(device, 2.0e11)  # forward + input grads of a frozen base
    eager = record.get("eager_s_per_token")
    if eager is None:
        eager = estimate
    elif not measured and estimate > 0:
        # a machine slower than the default estimate (a slower CPU, or one busy with other
        # work when the step was measured) compiles slower too: scale the assumed cost alike
        cost *= max(1.0, float(eager) / estimate)
    compiled = record.get("compiled_s_per_token")
    gain = (float(eager) - float(compiled)) if compiled is not None else DEFAULT_GAIN * float(eager)
    saving = max(steps, 0) * tokens_per_step * gain
    what = (f"expected saving {saving:.0f}s over {steps} steps vs compile "
            f"{cost:.0f}s{' (measured)' if measured else ' (assumed)'}")
    if gain <= 0:
        return CompileDecision(False, "compiled steps measured no faster here")
    return CompileDecision(saving > MARGIN * cost, what)


class StepClock:
    """Wall-clock intervals between training ``compute_loss`` calls, to measure the
    steady step time per token and the compile seconds (first interval minus a
    steady one); writes the record once enough steps were seen."""

    def __init__(self, signature: str, compiled: bool, *, need: int = 6) -> None:
        self.signature = signature
        self.compiled = compiled
        self.need = need
        self.last: float | None = None
        self.last_tokens = 0
        self.first: float | None = None
        self.first_tokens = 0
        self.per_token: list[float] = []
        self.done = False

    def steady_tokens_per_s(self) -> float | None:
        """Tokens per second of the steps after the first (which carries any compile),
        from the median interval; None before three intervals were seen."""
        if len(self.per_token) < 3:
            return None
        return 1.0 / statistics.median(self.per_token)

    def tick(self, tokens: int) -> None:
        now = time.perf_counter()
        if self.last is not None and self.last_tokens:
            dt = now - self.last
            if self.first is None:
                self.first, self.first_tokens = dt, self.last_tokens
            else:
                self.per_token.append(dt / self.last_tokens)
        self.last, self.last_tokens = now, tokens
        if not self.done and len(self.per_token) >= self.need:
            self.done = True
            steady = statistics.median(self.per_token)
            if self.compiled:
                extra = max(0.0, (self.first or 0.0) - steady * self.first_tokens)
                write_record(self.signature, compiled_s_per_token=steady, compile_s=extra)
            else:
                write_record(self.signature, eager_s_per_token=steady)
