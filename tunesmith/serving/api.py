"""The HTTP side of the server: OpenAI's request/response shapes on FastAPI (imported by
:func:`create_app`, not by ``import tunesmith.serving``).

Generation endpoints are ``async``: they encode the prompt, hand the sequences to
the engine (:meth:`ModelServer.submit`) and await its events, so hundreds of open
requests cost no threads. A client that disconnects cancels its sequences (their
batch slots are free at the next step): streams notice at once, non-streaming
requests within a second.

One pure-ASGI middleware does the API-key check, the request metrics and one
structured log line per request (fields the endpoint learned: model, adapter,
tokens, finish reasons).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from typing import Any, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tunesmith.core.errors import TunesmithError
from tunesmith.serving.metrics import log_event
from tunesmith.serving.types import BASE_NAME, Generation, SamplingParams, ServingError

# "ModelServer" annotations name tunesmith.serving.server.ModelServer, which imports
# this module: not imported here, even for type checkers, so the modules form no cycle

#: roles a chat message may have (OpenAI's; ``developer`` is treated as ``system``)
ROLES = ("system", "developer", "user", "assistant", "tool", "function")
MAX_N = 16
MAX_STOP = 4
GENERATION_ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
_ENDPOINTS = ("/health", "/metrics", "/v1/models", "/v1/adapters", *GENERATION_ENDPOINTS)
#: how often a waiting non-streaming request checks that its client is still there
DISCONNECT_POLL_S = 1.0


# --------------------------------------------------------------------------- request bodies
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class _Req(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields we ignore
    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = Field(None, ge=1, le=MAX_N)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Any) -> Any:
        items = [v] if isinstance(v, str) else list(v or [])
        if len(items) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s for s in items):
            raise ValueError("stop sequences must not be empty")
        return v

    @model_validator(mode="after")
    def _unsupported(self) -> "_Req":
        extra = self.model_extra or {}
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        if extra.get("logprobs") or extra.get("top_logprobs"):
            raise ValueError("logprobs are not supported by this server")
        if extra.get("tools") or extra.get("functions"):
            raise ValueError("tools / function calling are not supported by this server")
        rf = extra.get("response_format")
        if isinstance(rf, dict) and rf.get("type", "text") != "text":
            raise ValueError(f"response_format '{rf.get('type')}' is not supported (text only)")
        return self


class CompletionRequest(_Req):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _completion(self) -> "CompletionRequest":
        if self.echo:
            raise ValueError("echo is not supported by this server")
        if self.suffix:
            raise ValueError("suffix is not supported by this server")
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise ValueError("best_of other than n is not supported by this server")
        return self


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict] | None = None

    @field_validator("role")
    @classmethod
    def _role(cls, v: str) -> str:
        if v not in ROLES:
            raise ValueError(f"unknown role '{v}'; expected one of {', '.join(ROLES)}")
        return v

    @field_validator("content")
    @classmethod
    def _content(cls, v: Any) -> Any:
        if isinstance(v, list):
            for part in v:
                kind = part.get("type")
                if kind != "text":
                    raise ValueError(f"content part type '{kind}' is not supported (text only)")
                if not isinstance(part.get("text"), str):
                    raise ValueError("a text content part needs a 'text' string")
        return v


class ChatRequest(_Req):
    messages: list[ChatMessage] = Field(min_length=1)


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    path: str


# --------------------------------------------------------------------------- helpers
def _error_body(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _endpoint(path: str) -> str:
    if path in _ENDPOINTS:
        return path
    if path.startswith("/v1/adapters/"):
        return "/v1/adapters/{name}"
    if path.startswith("/v1/models/"):
        return "/v1/models/{id}"
    return "other"


class _Observe:
    """API key, request metrics and the per-request log line (pure ASGI, so streams
    and disconnects pass straight through)."""

    def __init__(self, app: Any, server: "ModelServer", api_key: str | None) -> None:
        self.app, self.server, self.api_key = app, server, api_key

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from starlette.responses import JSONResponse

        t0 = time.perf_counter()
        info: dict[str, Any] = {"id": "req-" + uuid.uuid4().hex[:16]}
        scope["tunesmith"] = info
        path = scope.get("path", "")
        endpoint = _endpoint(path)
        status = {"code": 500}

        async def _send(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                status["code"] = msg["status"]
                msg.setdefault("headers", [])
                msg["headers"] = [*msg["headers"], (b"x-request-id", info["id"].encode())]
            await send(msg)

        failed: BaseException | None = None
        try:
            denied = self._denied(scope) if self.api_key and path != "/health" else None
            if denied is not None:
                info["error_code"] = denied[1]
                await JSONResponse(_error_body(401, denied[0], "authentication_error", denied[1]), status_code=401)(
                    scope, receive, _send)
            else:
                await self.app(scope, receive, _send)
        except BaseException as exc:
            failed = exc
            raise
        finally:
            code = status["code"] if failed is None else 500
            secs = time.perf_counter() - t0
            self.server.metrics.request(endpoint, code, secs if endpoint in GENERATION_ENDPOINTS else None)
            if code >= 400:
                self.server.metrics.error(info.get("error_code") or str(code))
            fields = {"method": scope.get("method"), "path": path, "status": code, "ms": round(1000 * secs, 1), **info}
            if failed is not None and not isinstance(failed, asyncio.CancelledError):
                fields["error"] = f"{type(failed).__name__}: {failed}"
                log_event("error", logging.ERROR, **fields)
            quiet = endpoint in ("/health", "/metrics") and code < 400
            log_event("request", logging.DEBUG if quiet else (logging.WARNING if code >= 500 else logging.INFO), **fields)

    def _denied(self, scope: dict) -> tuple[str, str] | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        auth = headers.get("authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else headers.get("x-api-key", "")
        if not token:
            return "missing API key (Authorization: Bearer KEY)", "missing_api_key"
        if not hmac.compare_digest(token.encode(), str(self.api_key).encode()):
            return "invalid API key", "invalid_api_key"
        return None


def create_app(server: "ModelServer", *, api_key: str | None = None) -> Any:
    """The FastAPI application around ``server``."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from tunesmith import __version__

    app = FastAPI(title="tunesmith", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_middleware(_Observe, server=server, api_key=api_key)

    def error(request: Request | None, status: int, message: str, type_: str = "invalid_request_error",
              code: str | None = None, param: str | None = None, headers: dict | None = None) -> JSONResponse:
        if request is not None and "tunesmith" in request.scope:
            request.scope["tunesmith"].update(error_code=code, error=message)
        return JSONResponse(_error_body(status, message, type_, code, param), status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":
            return error(request, 400, "the request body is not valid JSON", code="invalid_json")
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        # pydantic tries each member of a union; name the field, not the member
        loc = [p for p in loc if not any(p.startswith(t) for t in ("str", "list[", "int", "function-"))]
        where = ".".join(loc)
        msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        return error(request, 400, f"{where}: {msg}" if where else msg, code="invalid_request", param=where or None)

    @app.exception_handler(ServingError)
    async def _serving(request: Request, exc: ServingError) -> JSONResponse:
        return error(request, exc.status, exc.message, exc.type, exc.code, exc.param, exc.headers or None)

    @app.exception_handler(TunesmithError)
    async def _tunesmith(request: Request, exc: TunesmithError) -> JSONResponse:
        return error(request, 400, str(exc), code="invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(request, exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)

    def _params(req: _Req) -> SamplingParams:
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        max_tokens = req.max_completion_tokens or req.max_tokens or server.options.default_max_tokens
        temperature = 1.0 if req.temperature is None else float(req.temperature)
        return SamplingParams(int(max_tokens), temperature, 1.0 if req.top_p is None else float(req.top_p), tuple(stop),
                              req.seed)

    async def _run(request: Request, req: _Req, target: str, prompts: list[list[int]], *, chat: bool) -> Any:
        info = request.scope.get("tunesmith", {})
        n = req.n or 1
        info.update(model=req.model, adapter=target, stream=bool(req.stream), n=n)
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def sink_for(index: int) -> Any:
            def sink(kind: str, payload: Any) -> None:
                try:
                    loop.call_soon_threadsafe(q.put_nowait, (index, kind, payload))
                except RuntimeError:  # the event loop is gone (shutdown)
                    pass
            return sink

        params = _params(req)
        seqs = server.submit(target, prompts, params, n=n, stream=bool(req.stream), sink_for=sink_for, rid=info.get("id"),
                             chat=chat)
        cid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        prompt_tokens = sum(len(s.prompt) for s in seqs if s.index % n == 0)
        gens: dict[int, Generation] = {}

        def cancel_rest() -> None:
            for s in seqs:
                if not s.done:
                    server.cancel(s)

        def note(cancelled: bool = False) -> None:
            done = [gens[i] for i in sorted(gens)]
            info.update(prompt_tokens=prompt_tokens, completion_tokens=sum(g.completion_tokens for g in done),
                        finish_reason=[g.finish_reason for g in done] if n * len(prompts) > 1 else
                        (done[0].finish_reason if done else None))
            if cancelled:
                info["cancelled"] = True
            first = [s.t_first - s.t_submit for s in seqs if s.t_first is not None]
            if first:
                info["ttft_ms"] = round(1000 * min(first), 1)

        def usage() -> dict:
            c = sum(g.completion_tokens for g in gens.values())
            return {"prompt_tokens": prompt_tokens, "completion_tokens": c, "total_tokens": prompt_tokens + c}

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            obj = "chat.completion.chunk" if chat else "text_completion"

            def chunk(choices: list[dict], with_usage: dict | None = None) -> str:
                body: dict[str, Any] = {"id": cid, "object": obj, "created": created, "model": target, "choices": choices}
                if include_usage:
                    body["usage"] = with_usage
                return "data: " + json.dumps(body, ensure_ascii=False) + "\n\n"

            def choice(index: int, text: str | None, finish: str | None, role: bool = False) -> dict:
                if chat:
                    delta: dict[str, Any] = {}
                    if role:
                        delta["role"] = "assistant"
                    if text is not None:
                        delta["content"] = text
                    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
                return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}

            async def events() -> Any:
                total = len(seqs)
                finished = False
                try:
                    if chat:
                        for s in seqs:
                            yield chunk([choice(s.index, "", None, role=True)])
                    while len(gens) < total:
                        index, kind, payload = await q.get()
                        if kind == "delta":
                            yield chunk([choice(index, payload, None)])
                        elif kind == "done":
                            gens[index] = payload
                            yield chunk([choice(index, None if chat else "", payload.finish_reason)])
                        else:
                            info.update(error_code=payload.code, error=payload.message)
                            yield "data: " + json.dumps(_error_body(payload.status, payload.message, payload.type,
                                                                    payload.code)) + "\n\n"
                            break
                    if include_usage:
                        yield chunk([], usage())
                    yield "data: [DONE]\n\n"
                    finished = True
                finally:
                    cancel_rest()
                    note(cancelled=not finished)

            return _Stream(events(), on_close=cancel_rest, media_type="text/event-stream",
                           headers={"cache-control": "no-cache"})

        getter = asyncio.ensure_future(q.get())
        try:
            while len(gens) < len(seqs):
                done, _ = await asyncio.wait({getter}, timeout=DISCONNECT_POLL_S)
                if not done:
                    if await request.is_disconnected():
                        cancel_rest()
                        note(cancelled=True)
                        return Response(status_code=499)  # the client is gone; nobody reads this
                    continue
                index, kind, payload = getter.result()
                getter = asyncio.ensure_future(q.get())
                if kind == "done":
                    gens[index] = payload
                elif kind == "error":
                    raise payload
        finally:
            getter.cancel()
            cancel_rest()
        note()
        ordered = [gens[i] for i in range(len(seqs))]
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": g.text}, "logprobs": None,
                        "finish_reason": g.finish_reason} for i, g in enumerate(ordered)]
        else:
            choices = [{"index": i, "text": g.text, "logprobs": None, "finish_reason": g.finish_reason}
                       for i, g in enumerate(ordered)]
        return {"id": cid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": target, "choices": choices, "usage": usage()}

    def _target(req: _Req, request: Request) -> str:
        return server.route(req.model, req.user or request.headers.get("x-request-id"))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "base": str(server.base_dir or server.base_name), "adapters": sorted(server.adapter_paths()),
                "registry": str(server.registry.root) if server.registry is not None else None, **server.stats()}

    @app.get("/metrics")
    async def metrics() -> Any:
        return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def _model_card(n: str, paths: dict[str, str]) -> dict:
        return {"id": n, "object": "model", "created": server.created, "owned_by": "tunesmith",
                "root": BASE_NAME if n == BASE_NAME else paths.get(n, n),
                "parent": None if n == BASE_NAME else BASE_NAME}

    @app.get("/v1/models")
    async def models() -> dict:
        paths = server.adapter_paths()
        return {"object": "list", "data": [_model_card(n, paths) for n in server.names()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        if model_id not in server.names():
            raise ServingError(f"the model '{model_id}' does not exist", status=404, code="model_not_found", param="model")
        return _model_card(model_id, server.adapter_paths())

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        target = _target(req, request)
        p = req.prompt
        if isinstance(p, str):
            prompts = [server.encode_text(p, target)]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]  # type: ignore[arg-type]
        elif p:
            prompts = [server.encode_text(x, target) if isinstance(x, str) else list(x) for x in p]  # type: ignore[union-attr]
        else:
            raise ServingError("prompt must not be empty", code="invalid_prompt", param="prompt")
        if len(prompts) * (req.n or 1) > MAX_N * 4:
            raise ServingError(f"at most {MAX_N * 4} choices per request (prompts x n)", param="prompt")
        return await _run(request, req, target, prompts, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request) -> Any:
        target = _target(req, request)
        ids = server.encode_chat([m.model_dump() for m in req.messages], target)  # the adapter's own template
        return await _run(request, req, target, [ids], chat=True)

    @app.get("/v1/adapters")
    async def list_adapters() -> dict:
        return {"object": "list", "data": [{"name": n, "path": p} for n, p in sorted(server.adapter_paths().items())]}

    @app.post("/v1/adapters")
    def load(req: LoadRequest, request: Request) -> dict:  # blocking: runs in the thread pool
        request.scope.get("tunesmith", {}).update(adapter=req.name)
        try:
            return server.load_adapter(req.name, req.path)
        except ServingError:
            raise
        except TunesmithError as exc:
            raise ServingError(str(exc), status=404 if "no PEFT adapter" in str(exc) else 400, code="adapter_not_found") from None

    @app.delete("/v1/adapters/{name}")
    def unload(name: str, request: Request) -> dict:  # waits for the adapter's requests: thread pool
        request.scope.get("tunesmith", {}).update(adapter=name)
        return server.unload_adapter(name)

    class _Stream(StreamingResponse):
        """A stream that cancels its sequences however it ends (even if never started)."""

        def __init__(self, content: Any, *, on_close: Any, **kw: Any) -> None:
            super().__init__(content, **kw)
            self._on_close = on_close

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                self._on_close()

    return app
