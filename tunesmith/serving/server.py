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

Prompts as training rendered them: every adapter answers with its own tokenizer, the
one training saved beside it (:class:`~tunesmith.serving.engine.Codec`): chat
requests go through that tokenizer's chat template (the one the run trained with,
the default for base models included) exactly as training rendered prompts
(:func:`tunesmith.core.render.render_prompt`); its end-of-turn token ends answers;
when the run added tokens to the vocabulary, the shared base's embeddings grow to
them and the adapter's trained rows are written into the new rows (other models
never sample them).

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
from tunesmith.serving.engine import BatchEngine, Codec, ModelGate, SerialEngine, Sequence, Sink
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
        self.eos_ids = _eos_ids(model, tokenizer)
        self._base_rows = self.vocab_rows()
        self.base_codec = self._codec(tokenizer, self._base_rows)
        self.tok_lock = self.base_codec.lock
        self._codecs: dict[str, Codec] = {}  # public adapter name -> its tokenizer etc.
        # vocabulary rows written from adapters' trained tokens: (module, id) -> (adapter, values)
        self._token_rows: dict[tuple[str, int], tuple[str, Any]] = {}
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

    def vocab_rows(self) -> int:
        """Rows of the (shared) input embedding now."""
        emb = self.base.get_input_embeddings()
        return int(getattr(emb, "num_embeddings", 0) or emb.weight.shape[0])

    def _codec(self, tokenizer: Any, vocab: int) -> Codec:
        """A model's codec: its tokenizer, the ids that end its answers (the base's EOS
        ids, the tokenizer's EOS, which tunesmith makes the template's end-of-turn, and
        that end-of-turn token), and for chat requests the template's other stop tokens
        and stop strings (:func:`tunesmith.core.templates.stop_tokens`)."""
        from tunesmith.core.templates import detect_builtin, end_of_turn_token, stop_tokens

        eos = set(self.eos_ids)
        for t in (tokenizer.eos_token, end_of_turn_token(tokenizer)):
            if t is not None and tokenizer.convert_tokens_to_ids(t) is not None:
                eos.add(int(tokenizer.convert_tokens_to_ids(t)))
        chat_eos: set[int] = set()
        stops: list[str] = []
        specials = set(tokenizer.all_special_tokens) | set(getattr(tokenizer, "added_tokens_encoder", {}) or {})
        for t in stop_tokens(tokenizer) if getattr(tokenizer, "chat_template", None) else []:
            if t in specials:
                chat_eos.add(int(tokenizer.convert_tokens_to_ids(t)))
            elif t not in stops:
                stops.append(t)
        name = getattr(tokenizer, "_tunesmith_default_template", None) or detect_builtin(tokenizer)[0]
        return Codec(tokenizer, eos=eos, vocab=vocab, template=name, stop=tuple(stops), chat_eos=chat_eos - eos)

    def codec(self, name: str) -> Codec:
        """The codec of a public name (``base`` or an adapter)."""
        if name in (BASE_NAME, self.base_name):
            return self.base_codec
        with self._state:
            c = self._codecs.get(name)
        if c is None:
            raise ServingError(f"the model '{name}' does not exist", status=404, code="model_not_found", param="model")
        return c

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
            tokenizer = self._adapter_tokenizer(folder)
            with self._mutation:
                with self._state:
                    if name in self.adapters:
                        raise ServingError(f"adapter '{name}' is already loaded", status=409, code="adapter_exists")
                internal = f"adapter_{next(self._counter)}"
                with _TokenRows(folder, cfg) as split:
                    conflicts = self._token_conflicts(name, split.rows)
                    if conflicts:
                        raise ServingError(f"{folder}: its trained rows for token id(s) {conflicts} differ from those of "
                                           "an adapter already loaded; serve them from separate servers",
                                           status=409, code="token_conflict")
                    vocab = max(self._base_rows, len(tokenizer))
                    with self.gate.mutate():
                        grown = self._grow(len(tokenizer))  # the run added tokens: as eval, fit the base to them
                        try:
                            if self.model is self.base:
                                self.model = PeftModel.from_pretrained(self.base, str(split.folder), adapter_name=internal,
                                                                       is_trainable=False)
                            else:
                                self.model.load_adapter(str(split.folder), adapter_name=internal, is_trainable=False)
                        except Exception:
                            self._forget(internal)
                            raise
                        self._write_rows(name, split.rows)
                        self.model.eval()
                        self._adapters_changed()
                codec = self._codec(tokenizer, vocab)
                with self._state:
                    self.adapters[name] = str(folder)
                    self._peft_names[name] = internal
                    self._codecs[name] = codec
        except Exception as exc:
            self.metrics.adapter_load("error")
            log_event("adapter_load", name=name, path=str(path), ok=False, error=str(exc))
            raise
        ms = round(1000 * (time.perf_counter() - t0), 1)
        self.metrics.adapter_load("ok")
        log_event("adapter_load", name=name, path=str(folder), ok=True, ms=ms, peft_type=ptype, r=getattr(cfg, "r", None),
                  chat_template=codec.template, trained_tokens=len(split.ids), grew_embeddings=grown or None)
        return {"name": name, "path": str(folder)}

    def _adapter_tokenizer(self, folder: Path) -> Any:
        """The tokenizer training saved beside the adapter (with the run's chat template),
        prepared as ``tunesmith eval`` prepares it; the base's when the folder has none."""
        if not ((folder / "tokenizer_config.json").exists() or (folder / "tokenizer.json").exists()):
            return self.tokenizer
        from transformers import AutoTokenizer

        from tunesmith.core.templates import setup_tokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
        except Exception as exc:  # noqa: BLE001 - a broken tokenizer file
            raise ServingError(f"{folder}: cannot read the adapter's tokenizer: {type(exc).__name__}: {exc}",
                               code="invalid_adapter") from None
        setup_tokenizer(tok, padding_side="left")
        return tok

    def _token_conflicts(self, name: str, rows: dict[str, tuple[list[int], Any]]) -> list[int]:
        import torch

        bad = []
        with self._state:
            for module, (ids, values) in rows.items():
                for k, i in enumerate(ids):
                    have = self._token_rows.get((module, i))
                    if have is not None and have[0] != name and not torch.equal(have[1], values[k]):
                        bad.append(i)
        return sorted(set(bad))

    def _grow(self, size: int) -> bool:
        """Grow the shared base's embeddings (and a tied head) to ``size`` rows (inside the gate)."""
        if size <= self.vocab_rows():
            return False
        self.base.resize_token_embeddings(size, mean_resizing=False)
        return True

    def _write_rows(self, name: str, rows: dict[str, tuple[list[int], Any]]) -> None:
        """The adapter's trained token rows into the base's embedding (and head) rows
        (peft's trainable tokens replace those rows; nobody else samples them)."""
        import torch

        for module, (ids, values) in rows.items():
            weight = self.base.get_submodule(module).weight
            with torch.no_grad():
                weight[torch.tensor(ids, device=weight.device)] = values.to(weight.device, weight.dtype)
            with self._state:
                for k, i in enumerate(ids):
                    self._token_rows[(module, i)] = (name, values[k].clone())

    def _adapters_changed(self) -> None:
        """Inside the gate, after the model's adapters changed."""
        hook = getattr(self.engine, "adapters_changed", None) if hasattr(self, "engine") else None
        if hook is not None:
            hook(self.model)

    def _forget(self, internal: str) -> None:
        """Take a half-loaded adapter out again (inside the gate)."""
        model = self.model
        if model is self.base or internal not in getattr(model, "peft_config", {}):
            return
        if len(model.peft_config) == 1:
            self.model = self.base = model.unload()
        else:
            model.delete_adapter(internal)
        self._adapters_changed()

    def unload_adapter(self, name: str) -> dict:
        t0 = time.perf_counter()
        with self._state:
            if name not in self.adapters:
                raise ServingError(f"adapter '{name}' is not loaded", status=404, code="model_not_found")
            path = self.adapters.pop(name)  # no new request is routed to it from here on
            internal = self._peft_names.pop(name)
            self._codecs.pop(name, None)
            for key in [k for k, v in self._token_rows.items() if v[0] == name]:
                del self._token_rows[key]  # the rows stay; no model samples them any more
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
            self._adapters_changed()
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
    def encode_chat(self, messages: list[dict], name: str = BASE_NAME) -> list[int]:
        """Token ids of a conversation for ``name``, rendered as training rendered it:
        that model's chat template with the assistant prompt, no extra special tokens."""
        from tunesmith.core.render import render_prompt

        codec = self.codec(name)
        msgs = []
        for m in messages:
            content = m.get("content")
            if isinstance(content, list):  # OpenAI content parts (text only)
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
            role = "system" if m["role"] == "developer" else m["role"]
            msgs.append({"role": role, "content": content or ""})
        if not getattr(codec.tokenizer, "chat_template", None):
            raise ServingError(f"the model '{name}' has no chat template; use /v1/completions", code="no_chat_template")
        with codec.lock:
            text = render_prompt(codec.tokenizer, msgs)
            return codec.tokenizer(text, add_special_tokens=False)["input_ids"]

    def render_chat(self, messages: list[dict], name: str = BASE_NAME) -> str:
        """The prompt text :meth:`encode_chat` tokenises (for checks and debugging)."""
        from tunesmith.core.render import render_prompt

        codec = self.codec(name)
        with codec.lock:
            return render_prompt(codec.tokenizer, messages)

    def encode_text(self, prompt: str, name: str = BASE_NAME) -> list[int]:
        codec = self.codec(name)
        with codec.lock:
            return codec.tokenizer(prompt)["input_ids"]

    # -- generation --------------------------------------------------------------
    def submit(self, name: str, prompts: list[list[int]], params: SamplingParams, *, n: int = 1, stream: bool = False,
               sink_for: Callable[[int], Sink], rid: str | None = None, chat: bool = False) -> list[Sequence]:
        """Queue ``n`` choices of each prompt for ``name`` (a public name: an adapter or
        ``base``); choice ``j`` of prompt ``i`` is index ``i * n + j`` and sends its events
        to ``sink_for(index)``; ``chat``: the prompts are chat renderings, so the
        template's stop strings apply too. Raises :class:`ServingError` (404, 400, 429)."""
        if params.max_tokens < 1 or params.max_tokens > self.max_tokens_limit:
            raise ServingError(f"max_tokens must be between 1 and {self.max_tokens_limit}", code="invalid_max_tokens",
                               param="max_tokens")
        codec = self.codec(name)
        if chat and codec.stop:
            params = SamplingParams(params.max_tokens, params.temperature, params.top_p,
                                    tuple(dict.fromkeys((*params.stop, *codec.stop))), params.seed)
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
            vocab = codec.vocab
            if vocab and any((not isinstance(t, int)) or t < 0 or t >= vocab for t in ids):
                raise ServingError(f"prompt token ids must be integers in [0, {vocab})", code="invalid_prompt", param="prompt")
            fixed.append([int(t) for t in ids])
        rid = rid or uuid.uuid4().hex
        with self._state:
            if name == BASE_NAME:
                internal = None
            elif name in self._peft_names:
                internal = self._peft_names[name]
                if self._codecs.get(name) is not codec:  # unloaded and loaded again meanwhile
                    raise ServingError(f"the model '{name}' changed while the request was read; retry", status=503,
                                       code="adapter_reloaded", type_="server_error")
            else:
                raise ServingError(f"the model '{name}' does not exist", status=404, code="model_not_found", param="model")
            seqs = []
            for i, ids in enumerate(fixed):
                for j in range(n):
                    p = params
                    if params.seed is not None and j:
                        p = SamplingParams(params.max_tokens, params.temperature, params.top_p, params.stop, params.seed + j)
                    seqs.append(Sequence(rid=rid, index=i * n + j, model=name, adapter=internal, prompt=ids, params=p,
                                         stream=stream, sink=sink_for(i * n + j), codec=codec, chat=chat))
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


class _TokenRows:
    """An adapter whose run added tokens (peft ``trainable_token_indices``): its trained
    rows, read from the adapter, and a copy of the folder without them for peft (whose
    trainable-token layers cannot share a model with other adapters, nor take part
    in mixed batches with them); the rows are written into the base instead.
    ``folder`` is the adapter itself when it has no such rows."""

    def __init__(self, folder: Path, cfg: Any) -> None:
        self.src, self.cfg = folder, cfg
        self.folder = folder
        self.rows: dict[str, tuple[list[int], Any]] = {}
        self._tmp: Any = None

    @property
    def ids(self) -> list[int]:
        return sorted({i for ids, _ in self.rows.values() for i in ids})

    def __enter__(self) -> "_TokenRows":
        import json
        import shutil
        import tempfile

        tti = getattr(self.cfg, "trainable_token_indices", None)
        if not tti:
            return self
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(self.src / "adapter_model.safetensors"))
        suffix = ".token_adapter.trainable_tokens_delta"
        keep = {}
        for key, value in tensors.items():
            if key.endswith(suffix):
                module = key[: -len(suffix)].removeprefix("base_model.model.")
                leaf = module.rsplit(".", 1)[-1]
                ids = tti.get(leaf) if isinstance(tti, dict) else tti
                if ids is None or len(ids) != value.shape[0]:
                    raise ServingError(f"{self.src}: trained token rows {key} do not match trainable_token_indices",
                                       code="invalid_adapter")
                self.rows[module] = ([int(i) for i in ids], value)
            else:
                keep[key] = value
        self._tmp = Path(tempfile.mkdtemp(prefix="tunesmith-adapter-"))
        conf = json.loads((self.src / "adapter_config.json").read_text(encoding="utf-8"))
        conf["trainable_token_indices"] = None
        (self._tmp / "adapter_config.json").write_text(json.dumps(conf), encoding="utf-8")
        save_file(keep, str(self._tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        self.folder = self._tmp
        self._cleanup = lambda: shutil.rmtree(self._tmp, ignore_errors=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._tmp is not None:
            self._cleanup()


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
