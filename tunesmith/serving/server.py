"""An OpenAI-compatible server: one base model, LoRA adapters loaded and unloaded at run time.

    app = create_app(ModelServer.from_paths("base/", {"support": "runs/a/final"}), api_key="s3cret")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (``model`` picks an adapter, ``base`` the plain base
model), ``GET /v1/adapters``, ``POST /v1/adapters`` (``{"name", "path"}``: load),
``DELETE /v1/adapters/{name}`` (unload). With a registry, ``model: "production"``
routes each request (by its ``user`` field or ``X-Request-ID`` header, MD5 bucket)
to the production version or, for the canary share, to the canary version.

Isolation: the base model is shared by every adapter through peft's multi-adapter
API, and which adapter is active is model-wide state. Every generation therefore
runs under one lock that covers choosing the adapter (``set_adapter`` or
``disable_adapter``) and generating, and loading/unloading takes the same lock, so a
request never sees another request's adapter, however many arrive at once.
"""

import contextlib
import hmac
import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel, ConfigDict, Field

from tunesmith.core.errors import TunesmithError

log = logging.getLogger("tunesmith.serving")

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
BASE_NAME = "base"
ROUTED_NAME = "production"


class ServingError(TunesmithError):
    def __init__(self, message: str, *, status: int = 400, code: str | None = None, type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.type = type_


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


@dataclass
class Generation:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    model: str


class ModelServer:
    """The shared base model, its adapters and the lock that keeps requests apart."""

    def __init__(self, model: Any, tokenizer: Any, *, base_name: str = BASE_NAME, max_tokens_limit: int = 2048) -> None:
        self.base = model
        self.model = model  # becomes a PeftModel once an adapter is loaded
        self.tokenizer = tokenizer
        self.base_name = base_name
        self.max_tokens_limit = max_tokens_limit
        self.adapters: dict[str, str] = {}
        self.lock = threading.Lock()
        # fast tokenizers mutate their padding/truncation state per call ("Already borrowed"
        # when two threads encode at once), so encoding and decoding take their own lock
        self.tok_lock = threading.Lock()
        self.registry: Any = None
        self.created = int(time.time())
        self.stats = {"requests": 0, "errors": 0}

    @classmethod
    def from_paths(cls, base: "str | Path", adapters: "dict[str, str | Path] | None" = None, *, dtype: str = "float32",
                   registries: Any = None, registry: "str | Path | None" = None, max_tokens_limit: int = 2048) -> "ModelServer":
        from tunesmith.core.models import load_from_dir

        base_dir = resolve_base(base, registries)
        model, tok = load_from_dir(base_dir, dtype=dtype, padding_side="left")
        model.eval()
        server = cls(model, tok, max_tokens_limit=max_tokens_limit)
        server.base_dir = base_dir
        for name, path in (adapters or {}).items():
            server.load_adapter(name, path)
        if registry is not None:
            server.attach_registry(registry)
        return server

    # -- adapters ------------------------------------------------------------
    def names(self) -> list[str]:
        extra = [ROUTED_NAME] if self.registry is not None else []
        return [BASE_NAME, *sorted(self.adapters), *extra]

    def load_adapter(self, name: str, path: str | Path) -> dict:
        if not isinstance(name, str) or not NAME_RE.fullmatch(name) or name in (BASE_NAME, ROUTED_NAME):
            raise ServingError(f"invalid adapter name {name!r}", code="invalid_name")
        folder = resolve_adapter(path)
        from peft import PeftConfig, PeftModel

        cfg = PeftConfig.from_pretrained(str(folder))
        if getattr(cfg, "is_prompt_learning", False):
            raise ServingError(f"{folder}: {cfg.peft_type} adapters cannot share a base with others; only LoRA-style adapters")
        with self.lock:
            if name in self.adapters:
                raise ServingError(f"adapter '{name}' is already loaded", status=409, code="adapter_exists")
            if self.model is self.base:
                self.model = PeftModel.from_pretrained(self.base, str(folder), adapter_name=name, is_trainable=False)
            else:
                self.model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
            self.model.eval()
            self.adapters[name] = str(folder)
        log.info("loaded adapter %s from %s", name, folder)
        return {"name": name, "path": str(folder)}

    def unload_adapter(self, name: str) -> dict:
        with self.lock:
            if name not in self.adapters:
                raise ServingError(f"adapter '{name}' is not loaded", status=404, code="model_not_found")
            if len(self.adapters) == 1:
                # the last one: take the LoRA layers out again (nothing merged)
                self.model = self.model.unload()
                self.base = self.model
            else:
                if name in _active(self.model):
                    other = next(n for n in self.adapters if n != name)
                    self.model.set_adapter(other)
                self.model.delete_adapter(name)
            path = self.adapters.pop(name)
        return {"name": name, "path": path, "unloaded": True}

    def attach_registry(self, path: str | Path) -> None:
        """Load the registry's production (and canary/staging) adapters under their version names."""
        from tunesmith.model_registry.local import ModelRegistry

        reg = ModelRegistry(path)
        data = reg.load()
        if not data["production"]:
            raise TunesmithError(f"registry {reg.root} has no production version")
        for v in {data["production"], data.get("canary"), data.get("staging")} - {None}:
            entry = reg._find(data, v)
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
            raise ServingError(f"registry version '{version}' is not loaded", status=503, code="not_loaded")
        if name in (BASE_NAME, self.base_name) or name in self.adapters:
            return BASE_NAME if name == self.base_name else name
        raise ServingError(f"the model '{name}' does not exist", status=404, code="model_not_found")

    # -- generation ----------------------------------------------------------
    def encode_chat(self, messages: list[dict]) -> list[int]:
        msgs = []
        for m in messages:
            content = m.get("content")
            if isinstance(content, list):  # OpenAI content parts
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
            msgs.append({"role": m["role"], "content": content or ""})
        if not getattr(self.tokenizer, "chat_template", None):
            raise ServingError("the base model's tokenizer has no chat template; use /v1/completions")
        with self.tok_lock:
            text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_text(self, prompt: str) -> list[int]:
        with self.tok_lock:
            return self.tokenizer(prompt)["input_ids"]

    def generate(self, name: str, input_ids: list[int], *, max_tokens: int = 16, temperature: float = 1.0,
                 top_p: float = 1.0, stop: list[str] | None = None, seed: int | None = None,
                 streamer: Any = None) -> Generation:
        import torch

        if max_tokens < 1 or max_tokens > self.max_tokens_limit:
            raise ServingError(f"max_tokens must be between 1 and {self.max_tokens_limit}", code="invalid_max_tokens")
        limit = getattr(self.base.config, "max_position_embeddings", None)
        if limit and len(input_ids) + max_tokens > limit:
            raise ServingError(f"prompt ({len(input_ids)} tokens) + max_tokens exceed the context length {limit}",
                               code="context_length_exceeded")
        ids = torch.tensor([input_ids], dtype=torch.long)
        kwargs: dict[str, Any] = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "max_new_tokens": int(max_tokens),
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": _eos_ids(self.base, self.tokenizer),
        }
        if streamer is not None:
            kwargs["streamer"] = streamer
        if temperature and temperature > 0:
            kwargs.update(do_sample=True, temperature=float(temperature), top_p=float(top_p))
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with self.lock:
            if name not in (BASE_NAME,) and name not in self.adapters:  # unloaded since routing
                raise ServingError(f"the model '{name}' does not exist", status=404, code="model_not_found")
            model = self.model
            if name == BASE_NAME:
                ctx = model.disable_adapter() if model is not self.base else contextlib.nullcontext()
            else:
                model.set_adapter(name)
                ctx = contextlib.nullcontext()
            if seed is not None:
                torch.manual_seed(int(seed))
            with ctx, torch.inference_mode():
                out = model.generate(**kwargs)
        new = out[0, ids.shape[1]:].tolist()
        eos = set(kwargs["eos_token_id"])
        finish = "length"
        if new and new[-1] in eos:
            finish = "stop"
        with self.tok_lock:
            text = self.tokenizer.decode(new, skip_special_tokens=True)
        if stop:
            cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
            if cut >= 0:
                text, finish = text[:cut], "stop"
        return Generation(text, finish, len(input_ids), len(new), name)


    def stream(self, name: str, input_ids: list[int], **kw: Any) -> Iterator[tuple[str, str | None]]:
        """Yield ``(text delta, None)`` while generating, then ``("", finish_reason)``."""
        import queue

        from transformers.generation.streamers import BaseStreamer

        q: "queue.Queue[Any]" = queue.Queue()
        prompt_len = len(input_ids)

        class _Ids(BaseStreamer):
            seen = 0

            def put(self, value: Any) -> None:
                ids = value.reshape(-1).tolist()
                if self.seen == 0 and len(ids) == prompt_len:  # the prompt comes first
                    self.seen = 1
                    return
                self.seen = 1
                q.put(("ids", ids))

            def end(self) -> None:
                pass

        result: dict[str, Any] = {}

        def work() -> None:
            try:
                result["gen"] = self.generate(name, input_ids, streamer=_Ids(), **kw)
            except BaseException as exc:  # noqa: BLE001 - handed to the reader
                result["error"] = exc
            finally:
                q.put(("end", None))

        threading.Thread(target=work, daemon=True).start()
        stop = [s for s in (kw.get("stop") or []) if s]
        new: list[int] = []
        sent = ""
        halted = False
        while True:
            kind, ids = q.get()
            if kind == "end":
                break
            new.extend(ids)
            if halted:
                continue
            with self.tok_lock:
                text = self.tokenizer.decode(new, skip_special_tokens=True)
            cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
            if cut >= 0:
                text, halted = text[:cut], True
            elif text.endswith("\ufffd"):  # half a multi-byte character: wait for the rest
                continue
            if len(text) > len(sent) and text.startswith(sent):
                yield text[len(sent):], None
                sent = text
        if "error" in result:
            raise result["error"]
        gen = result["gen"]
        if gen.text.startswith(sent) and len(gen.text) > len(sent):
            yield gen.text[len(sent):], None
        yield "", gen.finish_reason


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


# --------------------------------------------------------------------------- the HTTP app
class _Req(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields we ignore
    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    user: str | None = None


class CompletionRequest(_Req):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict] | None = None


class ChatRequest(_Req):
    messages: list[ChatMessage] = Field(min_length=1)


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    path: str


def create_app(server: ModelServer, *, api_key: str | None = None) -> Any:
    """The FastAPI application around ``server``."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from tunesmith import __version__

    app = FastAPI(title="tunesmith", version=__version__, docs_url=None, redoc_url=None)
    app.state.server = server

    def error(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": type_, "param": None, "code": code}}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":
            return error(400, "the request body is not valid JSON", code="invalid_json")
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error(400, f"{where}: {first.get('msg', 'invalid request')}" if where else "invalid request", code="invalid_request")

    @app.exception_handler(ServingError)
    async def _serving(request: Request, exc: ServingError) -> JSONResponse:
        return error(exc.status, exc.message, exc.type, exc.code)

    @app.exception_handler(TunesmithError)
    async def _tunesmith(request: Request, exc: TunesmithError) -> JSONResponse:
        return error(400, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)

    @app.middleware("http")
    async def _auth(request: Request, call_next: Any) -> Any:
        if api_key and request.url.path != "/health":
            header = request.headers.get("authorization", "")
            token = header[7:].strip() if header.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
            if not token:
                return error(401, "missing API key (Authorization: Bearer KEY)", "authentication_error", "missing_api_key")
            if not hmac.compare_digest(token.encode(), api_key.encode()):
                return error(401, "invalid API key", "authentication_error", "invalid_api_key")
        return await call_next(request)

    def _common(req: _Req, request: Request) -> tuple[str, dict]:
        target = server.route(req.model, req.user or request.headers.get("x-request-id"))
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        max_tokens = req.max_completion_tokens or req.max_tokens or 16
        return target, {"max_tokens": max_tokens, "temperature": req.temperature, "top_p": req.top_p, "stop": stop,
                        "seed": req.seed}

    def _usage(gens: list[Generation]) -> dict:
        p = sum(g.prompt_tokens for g in gens)
        c = sum(g.completion_tokens for g in gens)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def _sse(target: str, ids: list[int], kw: dict, *, chat: bool) -> Any:
        """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``."""
        import json as _json

        from fastapi.responses import StreamingResponse

        cid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str, finish: str | None, first: bool = False) -> str:
            if chat:
                d: dict[str, Any] = {"content": delta} if delta else {}
                if first:
                    d = {"role": "assistant", "content": delta}
                choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish}
            return "data: " + _json.dumps({"id": cid, "object": obj, "created": created, "model": target,
                                           "choices": [choice]}) + "\n\n"

        def events() -> Iterator[str]:
            first = True
            try:
                for delta, finish in server.stream(target, ids, **kw):
                    yield chunk(delta, finish, first)
                    first = False
            except TunesmithError as exc:
                yield "data: " + _json.dumps({"error": {"message": str(exc), "type": "invalid_request_error"}}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "base": str(getattr(server, "base_dir", server.base_name)), "adapters": sorted(server.adapters),
                "registry": str(server.registry.root) if server.registry is not None else None}

    @app.get("/v1/models")
    def models() -> dict:
        data = [{"id": n, "object": "model", "created": server.created, "owned_by": "tunesmith",
                 "root": BASE_NAME if n == BASE_NAME else server.adapters.get(n, n),
                 "parent": None if n == BASE_NAME else BASE_NAME} for n in server.names()]
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    def completions(req: CompletionRequest, request: Request) -> dict:
        target, kw = _common(req, request)
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if not prompts:
            raise ServingError("prompt must not be empty")
        if req.stream:
            if len(prompts) != 1:
                raise ServingError("stream=true takes one prompt")
            return _sse(target, server.encode_text(prompts[0]), kw, chat=False)
        gens = [server.generate(target, server.encode_text(p), **kw) for p in prompts]
        return {
            "id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
            "model": target,
            "choices": [{"index": i, "text": g.text, "logprobs": None, "finish_reason": g.finish_reason} for i, g in enumerate(gens)],
            "usage": _usage(gens),
        }

    @app.post("/v1/chat/completions")
    def chat(req: ChatRequest, request: Request) -> dict:
        target, kw = _common(req, request)
        ids = server.encode_chat([m.model_dump() for m in req.messages])
        if req.stream:
            return _sse(target, ids, kw, chat=True)
        g = server.generate(target, ids, **kw)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": target,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": g.text}, "logprobs": None,
                         "finish_reason": g.finish_reason}],
            "usage": _usage([g]),
        }

    @app.get("/v1/adapters")
    def list_adapters() -> dict:
        return {"object": "list", "data": [{"name": n, "path": p} for n, p in sorted(server.adapters.items())]}

    @app.post("/v1/adapters")
    def load(req: LoadRequest) -> dict:
        try:
            return server.load_adapter(req.name, req.path)
        except ServingError:
            raise
        except TunesmithError as exc:
            raise ServingError(str(exc), status=404 if "no PEFT adapter" in str(exc) else 400, code="adapter_not_found") from None

    @app.delete("/v1/adapters/{name}")
    def unload(name: str) -> dict:
        return server.unload_adapter(name)

    return app


def serve(app: Any, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level)
