"""An OpenAI-compatible server: one base model, LoRA adapters loaded and unloaded at run time.

    server = ModelServer.from_paths("base/", {"support": "runs/a/final"})   # batched engine
    app = create_app(server, api_key="s3cret")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints (see :mod:`tunesmith.serving.api`): ``GET /health``, ``GET /metrics``,
``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(``model`` picks an adapter, ``base`` the plain base model), ``GET/POST
/v1/adapters`` and ``DELETE /v1/adapters/{name}``. With a registry, ``model:
"production"`` routes each request (by its ``user`` field or ``X-Request-ID``
header, MD5 bucket) to the production version or, for the canary share, to the
canary version.

Generation runs in an engine thread (:mod:`tunesmith.serving.engine`): by default
continuous batching, where requests for any adapter (and the base) share each
forward through peft's mixed-adapter batches, so a row only ever sees its own
adapter. ``mode="serial"`` keeps the older one-request-at-a-time engine.

Isolation when adapters change: each adapter gets an internal peft name of its own;
loading one happens between two engine steps (:class:`~tunesmith.serving.engine.ModelGate`);
unloading one first takes its name out of routing, lets every request already
accepted for it finish, then deletes it between two steps. A request therefore
never runs on a half-loaded model nor on another adapter.
"""

from __future__ import annotations

import inspect
import itertools
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field

from tunesmith.core.errors import TunesmithError
from tunesmith.serving.engine import BatchEngine, ModelGate, SerialEngine, Sequence, Sink
from tunesmith.serving.metrics import Metrics, log_event
from tunesmith.serving.types import BASE_NAME, ROUTED_NAME, Generation, SamplingParams, ServingError

__all__ = ["ModelServer", "ServerOptions", "ServingError", "Generation", "SamplingParams", "create_app", "serve",
           "resolve_base", "resolve_adapter", "BASE_NAME", "ROUTED_NAME"]

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
#: peft adapter types whose layers take part in mixed-adapter batches
BATCHABLE_PEFT_TYPES = ("LORA",)


class ServerOptions(BaseModel):
    """Options of the in-process server (the ``transformers`` serving engine)."""

    model_config = ConfigDict(extra="forbid")
    mode: Literal["batched", "serial"] = Field(
        "batched", description="batched: continuous batching across adapters; serial: one request at a time (the old server).")
    max_batch_size: int = Field(32, ge=1, le=4096, description="Most sequences in one forward (batched mode).")
    max_wait_ms: float = Field(5.0, ge=0, le=60000,
                               description="When idle, how long a new request waits for others to prefill with it.")
    max_queue: int = Field(256, ge=1, description="Most sequences waiting for a slot; beyond it requests get 429 with Retry-After.")
    max_prefill_tokens: int = Field(4096, ge=1, description="Padded prompt tokens prefilled in one step (at least one request).")
    join_wait_ms: float = Field(
        0.0, ge=0, le=60000, description="While a batch runs, how long new requests may wait to prefill together "
        "(until a quarter of the running rows are waiting); 0: they join at the next step.")
    max_tokens_limit: int = Field(2048, ge=1, description="Largest max_tokens a request may ask for.")
    default_max_tokens: int = Field(16, ge=1, description="max_tokens when a request gives none.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    device: str = Field("auto", description="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    unload_timeout_s: float = Field(
        60.0, ge=0, description="How long unloading waits for the adapter's requests to finish before failing them (503).")


class ModelServer:
    """The shared base model, its adapters and the engine that generates for them."""

    def __init__(self, model: Any, tokenizer: Any, *, base_name: str = BASE_NAME, options: ServerOptions | None = None,
                 **overrides: Any) -> None:
        opts = (options or ServerOptions()).model_copy(update=overrides) if overrides else (options or ServerOptions())
        ServerOptions.model_validate(opts.model_dump())  # overrides are checked too
        self.options = opts
        self.base = model
        self.model = model  # becomes a PeftModel once an adapter is loaded
        self.tokenizer = tokenizer
        self.base_name = base_name
        self.max_tokens_limit = opts.max_tokens_limit
        self.mode = opts.mode
        self.adapters: dict[str, str] = {}  # public name -> folder
        self._peft_names: dict[str, str] = {}  # public name -> internal peft adapter name
        self._counter = itertools.count(1)
        self._state = threading.Condition()  # adapters, in-flight counts
        self._inflight: dict[str | None, int] = {}
        self._mutation = threading.Lock()  # one load/unload at a time
        self.gate = ModelGate()
        self.metrics = Metrics()
        self.registry: Any = None
        self.created = int(time.time())
        self.base_dir: Path | None = None
        # fast tokenizers mutate their state per call ("Already borrowed" when two threads
        # encode at once); request threads encode under this lock, the engine has its own copy
        self.tok_lock = threading.Lock()
        self.eos_ids = _eos_ids(model, tokenizer)
        self.context_limit = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        self.device = next(model.parameters()).device
        if self.mode == "batched":
            self._self_check()
            self.engine: Any = BatchEngine(self, max_batch_size=opts.max_batch_size, max_queue=opts.max_queue,
                                           max_wait_ms=opts.max_wait_ms, max_prefill_tokens=opts.max_prefill_tokens,
                                           join_wait_ms=opts.join_wait_ms)
        else:
            self.engine = SerialEngine(self, max_queue=opts.max_queue)
        self.metrics.gauges.update({
            "tunesmith_queue_depth": ("Sequences waiting for a slot in the batch.", lambda: self.engine.stats().queued),
            "tunesmith_running_sequences": ("Sequences in the running batch.", lambda: self.engine.stats().running),
            "tunesmith_max_batch_size": ("Most sequences in one forward.", lambda: self.engine.max_batch_size),
            "tunesmith_max_queue": ("Most sequences waiting before requests are refused (429).", lambda: self.engine.max_queue),
            "tunesmith_adapters_loaded": ("Adapters loaded.", lambda: len(self.adapters)),
        })

    @classmethod
    def from_paths(cls, base: "str | Path", adapters: "dict[str, str | Path] | None" = None, *, dtype: str | None = None,
                   registries: Any = None, registry: "str | Path | None" = None, options: ServerOptions | None = None,
                   **overrides: Any) -> "ModelServer":
        from tunesmith.core.models import load_from_dir

        if dtype is not None:
            overrides["dtype"] = dtype
        opts = ServerOptions.model_validate({**(options or ServerOptions()).model_dump(), **overrides})
        base_dir = resolve_base(base, registries)
        model, tok = load_from_dir(base_dir, dtype=opts.dtype, padding_side="left")
        device = _pick_device(opts.device)
        if str(device) != "cpu":
            model.to(device)
        model.eval()
        server = cls(model, tok, options=opts)
        server.base_dir = base_dir
        try:
            for name, path in (adapters or {}).items():
                server.load_adapter(name, path)
            if registry is not None:
                server.attach_registry(registry)
        except BaseException:
            server.close()
            raise
        log_event("startup", base=str(base_dir), mode=server.mode, device=str(server.device), adapters=sorted(server.adapters),
                  max_batch_size=opts.max_batch_size, max_queue=opts.max_queue)
        return server

    def _self_check(self) -> None:
        """One token through the model with the cache the batched engine manages."""
        import torch
        from transformers import DynamicCache

        from tunesmith.serving.engine import _check_cache

        params = inspect.signature(self.base.forward).parameters
        kw = "cache" if "cache" in params else "past_key_values"
        cache = DynamicCache()
        ids = torch.tensor([[self.tokenizer.pad_token_id or 0]], device=self.device)
        with torch.inference_mode():
            self.base(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.zeros_like(ids),
                      use_cache=True, **{kw: cache})
        try:
            _check_cache(cache)
        except ServingError as exc:
            raise TunesmithError(str(exc)) from None

    # -- adapters ------------------------------------------------------------
    def names(self) -> list[str]:
        extra = [ROUTED_NAME] if self.registry is not None else []
        with self._state:  # loads and unloads change the dict from other threads
            loaded = sorted(self.adapters)
        return [BASE_NAME, *loaded, *extra]

    def adapter_paths(self) -> dict[str, str]:
        with self._state:
            return dict(self.adapters)

    def load_adapter(self, name: str, path: str | Path) -> dict:
        if not isinstance(name, str) or not NAME_RE.fullmatch(name) or name in (BASE_NAME, ROUTED_NAME, self.base_name):
            raise ServingError(f"invalid adapter name {name!r}", code="invalid_name", param="name")
        t0 = time.perf_counter()
        try:
            folder = resolve_adapter(path)
            from peft import PeftConfig, PeftModel

            cfg = PeftConfig.from_pretrained(str(folder))
            if getattr(cfg, "is_prompt_learning", False):
                raise ServingError(f"{folder}: {cfg.peft_type} adapters cannot share a base with others; only LoRA-style adapters",
                                   code="unsupported_adapter")
            ptype = str(getattr(cfg.peft_type, "value", cfg.peft_type))
            if self.mode == "batched" and ptype not in BATCHABLE_PEFT_TYPES:
                raise ServingError(f"{folder}: {ptype} adapters cannot take part in mixed-adapter batches (LoRA and DoRA can);"
                                   " serve them with --mode serial", code="unsupported_adapter")
            with self._mutation:
                with self._state:
                    if name in self.adapters:
                        raise ServingError(f"adapter '{name}' is already loaded", status=409, code="adapter_exists")
                internal = f"adapter_{next(self._counter)}"
                with self.gate.mutate():
                    try:
                        if self.model is self.base:
                            self.model = PeftModel.from_pretrained(self.base, str(folder), adapter_name=internal,
                                                                   is_trainable=False)
                        else:
                            self.model.load_adapter(str(folder), adapter_name=internal, is_trainable=False)
                    except Exception:
                        self._forget(internal)
                        raise
                    self.model.eval()
                with self._state:
                    self.adapters[name] = str(folder)
                    self._peft_names[name] = internal
        except Exception as exc:
            self.metrics.adapter_load("error")
            log_event("adapter_load", name=name, path=str(path), ok=False, error=str(exc))
            raise
        ms = round(1000 * (time.perf_counter() - t0), 1)
        self.metrics.adapter_load("ok")
        log_event("adapter_load", name=name, path=str(folder), ok=True, ms=ms, peft_type=ptype, r=getattr(cfg, "r", None))
        return {"name": name, "path": str(folder)}

    def _forget(self, internal: str) -> None:
        """Take a half-loaded adapter out again (inside the gate)."""
        model = self.model
        if model is self.base or internal not in getattr(model, "peft_config", {}):
            return
        if len(model.peft_config) == 1:
            self.model = self.base = model.unload()
        else:
            model.delete_adapter(internal)

    def unload_adapter(self, name: str) -> dict:
        t0 = time.perf_counter()
        with self._state:
            if name not in self.adapters:
                raise ServingError(f"adapter '{name}' is not loaded", status=404, code="model_not_found")
            path = self.adapters.pop(name)  # no new request is routed to it from here on
            internal = self._peft_names.pop(name)
            deadline = time.monotonic() + self.options.unload_timeout_s
            while self._inflight.get(internal, 0) > 0 and time.monotonic() < deadline:
                self._state.wait(min(0.5, max(0.0, deadline - time.monotonic())))
            left = self._inflight.get(internal, 0)
        aborted = 0
        if left:
            err = ServingError(f"adapter '{name}' was unloaded", status=503, code="adapter_unloaded", type_="server_error")
            aborted = self._abort(internal, err)
            with self._state:
                while self._inflight.get(internal, 0) > 0:
                    self._state.wait(0.5)
        with self._mutation, self.gate.mutate():
            model = self.model
            if len(model.peft_config) == 1:
                # the last one: take the LoRA layers out again (nothing merged)
                self.model = self.base = model.unload()
            else:
                if internal in _active(model):
                    model.set_adapter(next(n for n in model.peft_config if n != internal))
                model.delete_adapter(internal)
        self.metrics.adapter_unload()
        log_event("adapter_unload", name=name, path=path, ms=round(1000 * (time.perf_counter() - t0), 1), aborted=aborted)
        return {"name": name, "path": path, "unloaded": True}

    def _abort(self, internal: str, err: ServingError) -> int:
        with self.engine._cv:
            seqs = [s for s in list(self.engine._waiting) + self.engine._running() if s.adapter == internal]
        for s in seqs:
            self.engine.cancel(s, err)
        return len(seqs)

    def attach_registry(self, path: str | Path) -> None:
        """Load the registry's production (and canary/staging) adapters under their version names."""
        from tunesmith.model_registry.local import ModelRegistry

        reg = ModelRegistry(path)
        data = reg.load()
        if not data["production"]:
            raise TunesmithError(f"registry {reg.root} has no production version")
        for v in sorted({data["production"], data.get("canary"), data.get("staging")} - {None}):
            entry = reg.get(v)
            art = entry["artifacts"].get("adapter") or entry["artifacts"].get("final")
            if art is None:
                raise TunesmithError(f"registry version '{v}' has no adapter artefact to serve")
            if v not in self.adapters:
                self.load_adapter(v, art)
        self.registry = reg

    def route(self, name: str, request_id: str | None) -> str:
        """The adapter (or base) that serves a request for ``name``."""
        if name == ROUTED_NAME and self.registry is not None:
            rid = request_id or uuid.uuid4().hex
            version = self.registry.route(rid)
            if version and version in self.adapters:
                return version
            raise ServingError(f"registry version '{version}' is not loaded", status=503, code="not_loaded",
                               type_="server_error")
        if name in (BASE_NAME, self.base_name):
            return BASE_NAME
        if name in self.adapters:
            return name
        raise ServingError(f"the model '{name}' does not exist", status=404, code="model_not_found", param="model")

    # -- prompts ---------------------------------------------------------------
    def encode_chat(self, messages: list[dict]) -> list[int]:
        msgs = []
        for m in messages:
            content = m.get("content")
            if isinstance(content, list):  # OpenAI content parts (text only)
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
            role = "system" if m["role"] == "developer" else m["role"]
            msgs.append({"role": role, "content": content or ""})
        if not getattr(self.tokenizer, "chat_template", None):
            raise ServingError("the base model's tokenizer has no chat template; use /v1/completions")
        with self.tok_lock:
            text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_text(self, prompt: str) -> list[int]:
        with self.tok_lock:
            return self.tokenizer(prompt)["input_ids"]

    # -- generation --------------------------------------------------------------
    def submit(self, name: str, prompts: list[list[int]], params: SamplingParams, *, n: int = 1, stream: bool = False,
               sink_for: Callable[[int], Sink], rid: str | None = None) -> list[Sequence]:
        """Queue ``n`` choices of each prompt for ``name`` (a public name: an adapter or
        ``base``); choice ``j`` of prompt ``i`` is index ``i * n + j`` and sends its events
        to ``sink_for(index)``. Raises :class:`ServingError` (404, 400, 429)."""
        if params.max_tokens < 1 or params.max_tokens > self.max_tokens_limit:
            raise ServingError(f"max_tokens must be between 1 and {self.max_tokens_limit}", code="invalid_max_tokens",
                               param="max_tokens")
        fixed: list[list[int]] = []
        for ids in prompts:
            if not ids:
                bos = self.tokenizer.bos_token_id
                if bos is None:
                    raise ServingError("the prompt is empty", code="invalid_prompt", param="prompt")
                ids = [int(bos)]
            if self.context_limit and len(ids) + params.max_tokens > self.context_limit:
                raise ServingError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceed the context length "
                                   f"{self.context_limit}", code="context_length_exceeded", param="max_tokens")
            vocab = int(getattr(self.base.config, "vocab_size", 0) or 0)
            if vocab and any((not isinstance(t, int)) or t < 0 or t >= vocab for t in ids):
                raise ServingError(f"prompt token ids must be integers in [0, {vocab})", code="invalid_prompt", param="prompt")
            fixed.append([int(t) for t in ids])
        rid = rid or uuid.uuid4().hex
        with self._state:
            if name == BASE_NAME:
                internal = None
            elif name in self._peft_names:
                internal = self._peft_names[name]
            else:
                raise ServingError(f"the model '{name}' does not exist", status=404, code="model_not_found", param="model")
            seqs = []
            for i, ids in enumerate(fixed):
                for j in range(n):
                    p = params
                    if params.seed is not None and j:
                        p = SamplingParams(params.max_tokens, params.temperature, params.top_p, params.stop, params.seed + j)
                    seqs.append(Sequence(rid=rid, index=i * n + j, model=name, adapter=internal, prompt=ids, params=p,
                                         stream=stream, sink=sink_for(i * n + j)))
            self._inflight[internal] = self._inflight.get(internal, 0) + len(seqs)
            try:
                self.engine.submit(seqs)
            except BaseException:
                self._inflight[internal] -= len(seqs)
                raise
        return seqs

    def cancel(self, seq: Sequence) -> None:
        self.engine.cancel(seq)

    def _finished(self, seq: Sequence) -> None:
        """Called by the engine exactly once per sequence (done, failed or cancelled)."""
        with self._state:
            self._inflight[seq.adapter] = self._inflight.get(seq.adapter, 1) - 1
            if self._inflight[seq.adapter] <= 0:
                del self._inflight[seq.adapter]
            self._state.notify_all()
        ttft = seq.t_first - seq.t_submit if seq.t_first is not None else None
        wait = seq.t_start - seq.t_submit if seq.t_start is not None else None
        self.metrics.sequence(seq.model, len(seq.prompt), len(seq.tokens), seq.finish_reason or "error", ttft, wait)

    def inflight(self) -> int:
        with self._state:
            return sum(self._inflight.values())

    def generate(self, name: str, input_ids: list[int], *, max_tokens: int = 16, temperature: float = 1.0,
                 top_p: float = 1.0, stop: list[str] | None = None, seed: int | None = None,
                 timeout: float | None = None) -> Generation:
        """One generation, blocking (Python API; the HTTP app uses :meth:`submit`)."""
        import queue

        q: "queue.Queue[tuple[str, Any]]" = queue.Queue()
        params = SamplingParams(int(max_tokens), float(temperature or 0.0), float(top_p), tuple(s for s in stop or () if s), seed)
        (seq,) = self.submit(name, [list(input_ids)], params, sink_for=lambda i: lambda k, p: q.put((k, p)))
        while True:
            try:
                kind, payload = q.get(timeout=timeout)
            except queue.Empty:
                self.cancel(seq)
                raise ServingError("generation timed out", status=504, code="timeout", type_="server_error") from None
            if kind == "done":
                return payload
            if kind == "error":
                raise payload

    def stream(self, name: str, input_ids: list[int], *, max_tokens: int = 16, temperature: float = 1.0, top_p: float = 1.0,
               stop: list[str] | None = None, seed: int | None = None) -> Iterator[tuple[str, str | None]]:
        """Yield ``(text delta, None)`` while generating, then ``("", finish_reason)``."""
        import queue

        q: "queue.Queue[tuple[str, Any]]" = queue.Queue()
        params = SamplingParams(int(max_tokens), float(temperature or 0.0), float(top_p), tuple(s for s in stop or () if s), seed)
        (seq,) = self.submit(name, [list(input_ids)], params, stream=True, sink_for=lambda i: lambda k, p: q.put((k, p)))
        try:
            while True:
                kind, payload = q.get()
                if kind == "delta":
                    yield payload, None
                elif kind == "done":
                    yield "", payload.finish_reason
                    return
                else:
                    raise payload
        finally:
            if not seq.done:
                self.cancel(seq)

    def stats(self) -> dict:
        s = self.engine.stats()
        return {"mode": self.mode, "queued": s.queued, "running": s.running, "inflight": self.inflight(),
                "max_batch_size": self.engine.max_batch_size, "max_queue": self.engine.max_queue}

    def close(self) -> None:
        """Stop the engine; whatever still waits or runs gets 503."""
        self.engine.close()

    def __enter__(self) -> "ModelServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def resolve_base(spec: str | Path, registries: Any = None) -> Path:
    """A base model folder from a folder, a GGUF file or a model-source name (``default``)."""
    p = Path(str(spec)).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise TunesmithError(f"{p} has no config.json: not a transformers model folder")
        return p
    if p.is_file() and p.suffix == ".gguf":
        from tunesmith.core.models import convert_gguf

        return convert_gguf(p)
    if NAME_RE.fullmatch(str(spec)) and "/" not in str(spec):
        from tunesmith.core.config import ModelSection
        from tunesmith.core.models import resolve_model_dir

        return resolve_model_dir(ModelSection(source=str(spec)), registries)
    raise TunesmithError(f"base model not found: {spec}", hint="a model folder, a .gguf file or a source name such as 'default'")


def resolve_adapter(path: str | Path) -> Path:
    """An adapter folder from a folder, a run directory (final/ or exports/adapter)."""
    p = Path(str(path)).expanduser()
    for cand in (p, p / "exports" / "adapter", p / "final"):
        if (cand / "adapter_config.json").exists():
            if not (cand / "adapter_model.safetensors").exists():
                raise TunesmithError(f"{cand}: no adapter_model.safetensors (tunesmith serves safetensors only)")
            return cand
    raise TunesmithError(f"no PEFT adapter at {p}", hint="give an adapter folder (adapter_config.json) or a run directory")


def _pick_device(spec: str) -> Any:
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def _active(model: Any) -> list[str]:
    a = getattr(model, "active_adapters", None)
    if callable(a):
        a = a()
    if a is None:
        a = getattr(model, "active_adapter", [])
    return [a] if isinstance(a, str) else list(a)


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    for e in ([eos] if isinstance(eos, int) else list(eos or [])) + [tokenizer.eos_token_id]:
        if e is not None and e not in ids:
            ids.append(int(e))
    return ids


def create_app(server: ModelServer, *, api_key: str | None = None) -> Any:
    """The FastAPI application around ``server`` (see :mod:`tunesmith.serving.api`)."""
    from tunesmith.serving.api import create_app as _create

    return _create(server, api_key=api_key)


def serve(app: Any, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    import uvicorn

    from tunesmith.serving.metrics import configure_logging

    configure_logging(log_level)
    # requests are logged by the app as structured lines; uvicorn's access log would repeat them
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
