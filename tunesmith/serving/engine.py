"""The generation engines behind :class:`~tunesmith.serving.server.ModelServer`.

``BatchEngine`` (the default) runs iteration-level ("continuous") batching: one
thread owns the model and loops over *steps*. Before each step it admits waiting
requests (up to ``max_batch_size`` rows and ``max_prefill_tokens`` padded prompt
tokens), prefills them together and merges their key/value cache into the running
batch; then one forward computes the next token of every running sequence, whatever
its adapter (the stacked LoRA weights of :mod:`tunesmith.serving.lora_batch`;
peft's mixed-adapter batches, ``adapter_names=``, where those do not apply). A sequence that hits
EOS, a stop string or its ``max_tokens`` leaves the batch at once and its slot is
free for the next step; so does a cancelled one (a client that went away).

The batch is kept *left-padded*: every row's cache ends at the same column, the
attention mask marks each row's real tokens and the position ids count them, so a
row computes exactly what it would alone. Merging pads the shorter cache on the
left; when rows leave, columns that are padding for every remaining row are cut.

``SerialEngine`` is the previous behaviour, kept for comparison
(``--mode serial``): one request at a time through ``model.generate``.

Both engines share the per-sequence logic (:meth:`_Engine._accept`): EOS, stop
strings (held back while streaming until they can no longer match), ``max_tokens``,
incremental detokenisation for streams, and the events sent to the request's sink:
``("delta", text)`` while streaming, then exactly one ``("done", Generation)`` or
``("error", ServingError)``.
"""

from __future__ import annotations

import copy
import inspect
import logging
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from tunesmith.serving.metrics import log_event
from tunesmith.serving.types import Generation, SamplingParams, ServingError

# "ModelServer" annotations name tunesmith.serving.server.ModelServer, which imports
# this module: not imported here, even for type checkers, so the modules form no cycle

log = logging.getLogger("tunesmith.serving")

#: peft's name for "no adapter" inside a mixed-adapter batch
PEFT_BASE = "__base__"

Sink = Callable[[str, Any], None]


class Codec:
    """How one model (the base, or one adapter) turns text into tokens and back: its
    tokenizer (an adapter's own, saved beside it by training, with the chat template
    it trained with), the token ids that end its answers (EOS and the template's
    end-of-turn), the template's other stop tokens and stop strings (chat requests
    only), and how many
    vocabulary rows its logits cover (rows added for another adapter's tokens are
    never sampled for it)."""

    __slots__ = ("tokenizer", "lock", "engine_tokenizer", "eos", "chat_eos", "vocab", "template", "stop")

    def __init__(self, tokenizer: Any, *, eos: "set[int] | list[int]", vocab: int, template: str | None = None,
                 stop: "tuple[str, ...]" = (), chat_eos: "set[int] | list[int]" = ()) -> None:
        self.tokenizer = tokenizer
        # fast tokenizers mutate their state per call ("Already borrowed" when two threads
        # encode at once): request threads encode under this lock, the engine has its own copy
        self.lock = threading.Lock()
        self.engine_tokenizer = copy.deepcopy(tokenizer)
        self.eos = set(int(e) for e in eos)
        self.chat_eos = set(int(e) for e in chat_eos)
        self.vocab = int(vocab)
        self.template = template
        self.stop = tuple(stop)


class Sequence:
    """One choice of one request: its prompt, sampling parameters, progress and sink."""

    __slots__ = ("rid", "index", "model", "adapter", "prompt", "params", "stream", "sink", "codec", "eos", "tokens", "text",
                 "sent", "finish_reason", "cancelled", "error", "done", "generator", "detok", "t_submit", "t_start",
                 "t_first", "t_done")

    def __init__(self, *, rid: str, index: int, model: str, adapter: str | None, prompt: list[int],
                 params: SamplingParams, stream: bool, sink: Sink, codec: Codec, chat: bool = False) -> None:
        self.rid = rid
        self.index = index
        self.model = model  # the public name the response carries
        self.adapter = adapter  # the peft adapter name, None for the base model
        self.prompt = prompt
        self.params = params
        self.stream = stream
        self.sink = sink
        self.codec = codec  # the model's tokenizer, end tokens and vocabulary
        self.eos = codec.eos | codec.chat_eos if chat else codec.eos  # the token ids that end it
        self.tokens: list[int] = []
        self.text = ""  # decoded so far (streams and stop strings only), then the final text
        self.sent = 0  # characters of ``text`` already streamed
        self.finish_reason: str | None = None
        self.cancelled = False
        self.error: ServingError | None = None
        self.done = False
        self.generator: Any = None
        self.detok: _Detokenizer | None = None
        self.t_submit = time.perf_counter()
        self.t_start: float | None = None
        self.t_first: float | None = None
        self.t_done: float | None = None

    @property
    def needs_text(self) -> bool:
        return self.stream or bool(self.params.stop)

    def __repr__(self) -> str:
        return f"<Sequence {self.rid}/{self.index} {self.model} {len(self.tokens)} tokens>"


class _Detokenizer:
    """Incremental decoding (the prefix/read offset scheme vLLM and TGI use): the text
    of the new tokens, decoded together with the previous token so that tokenizers
    which drop a word's leading space at the start of a slice still come out right,
    and held back while it ends in half a UTF-8 character."""

    __slots__ = ("tok", "ids", "prefix", "read")

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        after = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""


def _holdback(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of ``text`` could be the start of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class ModelGate:
    """The engine steps the model; loading and unloading adapters change it. A change
    waits for the step in progress and the next step waits for the change, so no
    forward ever runs on a half-loaded model. Changes go first (writer priority)."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._stepping = False
        self._waiting_writers = 0
        self._writing = False

    def step(self) -> "_GateCtx":
        return _GateCtx(self, write=False)

    def mutate(self) -> "_GateCtx":
        return _GateCtx(self, write=True)


class _GateCtx:
    def __init__(self, gate: ModelGate, write: bool) -> None:
        self.gate, self.write = gate, write

    def __enter__(self) -> None:
        g = self.gate
        with g._cv:
            if self.write:
                g._waiting_writers += 1
                while g._stepping or g._writing:
                    g._cv.wait()
                g._waiting_writers -= 1
                g._writing = True
            else:
                while g._waiting_writers or g._writing:
                    g._cv.wait()
                g._stepping = True

    def __exit__(self, *exc: Any) -> None:
        g = self.gate
        with g._cv:
            if self.write:
                g._writing = False
            else:
                g._stepping = False
            g._cv.notify_all()


@dataclass
class EngineStats:
    queued: int
    running: int


class _Engine:
    """What both engines share: the queue, the per-token logic, finishing and failing."""

    mode = "?"

    def __init__(self, server: "ModelServer", *, max_batch_size: int, max_queue: int, max_wait_ms: float) -> None:
        self.server = server
        self.max_batch_size = max(1, int(max_batch_size))
        self.max_queue = max(1, int(max_queue))
        self.max_wait = max(0.0, float(max_wait_ms)) / 1000.0
        self.context_limit = server.context_limit
        self._cv = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"tunesmith-{self.mode}-engine", daemon=True)
        self._thread.start()

    # -- called from request threads ------------------------------------------
    def submit(self, seqs: list[Sequence]) -> None:
        with self._cv:
            if self._closed:
                raise ServingError("the server is shutting down", status=503, code="shutting_down", type_="server_error")
            if len(self._waiting) + len(seqs) > self.max_queue:
                retry = self.server.metrics.retry_after(len(self._waiting))
                raise ServingError(
                    f"too many requests waiting ({len(self._waiting)} queued, at most {self.max_queue}); retry in {retry} s",
                    status=429, code="rate_limit_exceeded", type_="rate_limit_error", headers={"Retry-After": str(retry)})
            self._waiting.extend(seqs)
            self._cv.notify_all()

    def cancel(self, seq: Sequence, error: ServingError | None = None) -> None:
        """Stop ``seq`` at the next step (its slot is freed); ``error`` is sent to its sink."""
        if seq.done:
            return
        seq.error = error
        seq.cancelled = True
        with self._cv:
            self._cv.notify_all()

    def stats(self) -> EngineStats:
        return EngineStats(queued=len(self._waiting), running=self._running_count())

    def close(self, timeout: float = 30.0) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout)
        with self._cv:
            left = list(self._waiting)
            self._waiting.clear()
        err = ServingError("the server is shutting down", status=503, code="shutting_down", type_="server_error")
        for s in left + self._running():
            self._fail(s, err)

    # -- the engine thread ------------------------------------------------------
    def _run(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _running(self) -> list[Sequence]:
        return []

    def _running_count(self) -> int:
        return len(self._running())

    def _start(self, seq: Sequence) -> None:
        seq.t_start = time.perf_counter()
        if seq.needs_text:
            seq.detok = _Detokenizer(seq.codec.engine_tokenizer)

    def _accept(self, seq: Sequence, token: int) -> bool:
        """Take one generated token; True when the sequence has finished (and was finished)."""
        if seq.done:
            return True
        seq.tokens.append(token)
        if seq.t_first is None:
            seq.t_first = time.perf_counter()
        finish = "stop" if token in seq.eos else None
        stops = seq.params.stop
        if seq.detok is not None:
            delta = seq.detok.add(token)
            if delta:
                start = max(0, len(seq.text) - max(map(len, stops), default=0) + 1)
                seq.text += delta
                if stops:
                    hits = [i for i in (seq.text.find(s, start) for s in stops) if i >= 0]
                    if hits:
                        seq.text = seq.text[:min(hits)]
                        finish = "stop"
        if finish is None and len(seq.tokens) >= seq.params.max_tokens:
            finish = "length"
        if finish is None and self.context_limit and len(seq.prompt) + len(seq.tokens) >= self.context_limit:
            finish = "length"
        if finish is not None:
            self._finish(seq, finish)
            return True
        if seq.stream:
            safe = len(seq.text) - _holdback(seq.text, stops)
            if safe > seq.sent:
                seq.sink("delta", seq.text[seq.sent:safe])
                seq.sent = safe
        return False

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.done:
            return
        seq.done = True
        seq.t_done = time.perf_counter()
        truncated = reason == "stop" and seq.params.stop and (not seq.tokens or seq.tokens[-1] not in seq.eos)
        if not truncated:
            full = seq.codec.engine_tokenizer.decode(seq.tokens, skip_special_tokens=True)
            if not seq.stream or full.startswith(seq.text):
                seq.text = full
            hits = [i for i in (seq.text.find(s, seq.sent) for s in seq.params.stop) if i >= 0]
            if hits:  # a stop string the incremental text had not completed yet
                seq.text, reason = seq.text[:min(hits)], "stop"
        seq.finish_reason = reason
        if seq.stream and len(seq.text) > seq.sent:
            seq.sink("delta", seq.text[seq.sent:])
            seq.sent = len(seq.text)
        gen = Generation(seq.text, reason, len(seq.prompt), len(seq.tokens), seq.model)
        self.server._finished(seq)
        seq.sink("done", gen)

    def _fail(self, seq: Sequence, error: ServingError) -> None:
        if seq.done:
            return
        seq.done = True
        seq.finish_reason = "error"
        seq.t_done = time.perf_counter()
        self.server._finished(seq)
        seq.sink("error", error)

    def _drop(self, seq: Sequence) -> None:
        """A cancelled sequence leaves: with its error if it has one, quietly otherwise."""
        if seq.error is not None:
            self._fail(seq, seq.error)
        elif not seq.done:
            seq.done = True
            seq.finish_reason = "cancelled"
            seq.t_done = time.perf_counter()
            self.server._finished(seq)
            seq.sink("done", Generation(seq.text, "cancelled", len(seq.prompt), len(seq.tokens), seq.model))

    def _wait_for_work(self) -> bool:
        """Block until there is something to do; False when closed."""
        with self._cv:
            while not self._waiting and not self._running_count() and not self._closed:
                self._cv.wait()
            return not self._closed

    def _sample(self, logits: Any, rows: list[Sequence]) -> list[int]:
        """Greedy rows take the argmax; sampling rows their own temperature/top-p and
        their own torch.Generator (seeded by the request's ``seed``)."""
        import torch

        width = logits.shape[-1]
        if any(s.codec.vocab < width for s in rows):
            # rows the base grew for another adapter's added tokens: never this row's tokens
            limits = torch.tensor([s.codec.vocab for s in rows], device=logits.device)
            cols = torch.arange(width, device=logits.device)
            logits = logits.masked_fill(cols[None, :] >= limits[:, None], float("-inf"))
        out = logits.argmax(-1).tolist()
        for i, s in enumerate(rows):
            p = s.params
            if p.temperature <= 0:
                continue
            if s.generator is None:
                s.generator = torch.Generator(device=logits.device)
                s.generator.manual_seed(p.seed if p.seed is not None else secrets.randbits(63))
            row = logits[i].float() / p.temperature
            if p.top_p < 1.0:
                sorted_logits, order = torch.sort(row, descending=True)
                probs = sorted_logits.softmax(-1)
                # drop a token once the tokens before it already hold top_p of the mass
                drop = (probs.cumsum(-1) - probs) >= p.top_p
                sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
                row = torch.full_like(row, float("-inf")).scatter_(0, order, sorted_logits)
            out[i] = int(torch.multinomial(row.softmax(-1), 1, generator=s.generator))
        return out


class BatchEngine(_Engine):
    """Continuous batching over mixed adapters (see the module docstring)."""

    mode = "batched"

    def __init__(self, server: "ModelServer", *, max_batch_size: int = 32, max_queue: int = 256, max_wait_ms: float = 5.0,
                 max_prefill_tokens: int = 4096, join_wait_ms: float = 0.0) -> None:
        import torch

        self.max_prefill_tokens = max(1, int(max_prefill_tokens))
        self.join_wait = max(0.0, float(join_wait_ms)) / 1000.0
        self._rows: list[Sequence] = []
        self._cache: Any = None
        self._mask: Any = None  # [rows, cache columns] 1 = a real token
        self._pending: list[int] = []  # each row's last token, not yet in the cache
        self.steps = 0
        params = inspect.signature(server.base.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
        self._pad = server.tokenizer.pad_token_id if server.tokenizer.pad_token_id is not None else 0
        self._torch = torch
        from tunesmith.serving.lora_batch import FusedLoRA

        self.fused = FusedLoRA()  # stacked LoRA weights: a mixed batch in four operations per layer
        super().__init__(server, max_batch_size=max_batch_size, max_queue=max_queue, max_wait_ms=max_wait_ms)

    def adapters_changed(self, model: Any) -> None:
        """Called inside the model gate after an adapter loaded or unloaded."""
        self.fused.rebuild(model)

    def _running(self) -> list[Sequence]:
        return list(self._rows)

    def _running_count(self) -> int:
        return len(self._rows)

    def _run(self) -> None:
        while self._wait_for_work():
            admit = self._admit()
            try:
                with self.server.gate.step(), self._torch.inference_mode():
                    for s in [s for s in self._rows if s.cancelled]:
                        self._drop(s)
                    self._compact()
                    if admit:
                        self._prefill(admit)
                    if self._rows:
                        self._decode()
            except Exception as exc:  # noqa: BLE001 - one bad step must not stop the server
                failed = self._rows + admit
                log_event("error", logging.ERROR, where="engine_step", error=f"{type(exc).__name__}: {exc}",
                          rows=len(failed), requests=sorted({s.rid for s in failed}), exc_info=True)
                self.server.metrics.error("engine_error")
                err = ServingError(f"generation failed: {type(exc).__name__}: {exc}", status=500, code="engine_error",
                                   type_="server_error")
                for s in self._rows + admit:
                    self._fail(s, err)
                self._reset()

    def _admit(self) -> list[Sequence]:
        """Waiting sequences for the free slots, within the prefill token budget; waits
        up to ``max_wait`` for company when nothing is running."""
        with self._cv:
            if not self._rows and self._waiting and self.max_wait > 0:
                deadline = self._waiting[0].t_submit + self.max_wait
                while len(self._waiting) < self.max_batch_size and not self._closed:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    self._cv.wait(left)
            free = self.max_batch_size - len(self._rows)
            if self._rows and self._waiting and self.join_wait > 0:
                # a prefill costs about a whole decode step however few rows it has: let
                # joiners gather for a moment instead of stalling the batch for each one
                live_waiting = [s for s in self._waiting if not s.cancelled]
                want = min(free, max(1, len(self._rows) // 4))
                if live_waiting and len(live_waiting) < want and \
                        time.perf_counter() - live_waiting[0].t_submit < self.join_wait:
                    return []
            taken: list[Sequence] = []
            live = longest = 0
            while self._waiting and live < free:
                s = self._waiting[0]
                if s.cancelled:
                    taken.append(self._waiting.popleft())  # dropped by _prefill, outside this lock
                    continue
                if live and (live + 1) * max(longest, len(s.prompt)) > self.max_prefill_tokens:
                    break
                longest = max(longest, len(s.prompt))
                taken.append(self._waiting.popleft())
                live += 1
            return taken

    def _forward(self, ids: Any, mask: Any, pos: Any, cache: Any, rows: list[Sequence], last_only: bool) -> Any:
        kw: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, self._cache_kw: cache,
                              "use_cache": True}
        if last_only and self._keep_kw:
            kw[self._keep_kw] = 1
        model = self.server.model
        if model is not self.server.base and self.fused.ok:
            # every row with its own adapter through the stacked LoRA weights (lora_batch)
            self.fused.start([s.adapter for s in rows])
            try:
                out = self.server.base(**kw)
            finally:
                self.fused.stop()
            self.steps += 1
            return out.logits[:, -1, :]
        if model is not self.server.base:  # a PeftModel
            names = {s.adapter for s in rows}
            if len(names) == 1 and None not in names:
                # one adapter for every row: the plain LoRA forward, no per-adapter sub-batches
                (name,) = names
                if _active_names(model) != [name]:
                    model.set_adapter(name)
            else:  # a mixed batch: every row names its adapter
                kw["adapter_names"] = [s.adapter or PEFT_BASE for s in rows]
        out = model(**kw)
        self.steps += 1
        return out.logits[:, -1, :]

    def _prefill(self, group: list[Sequence]) -> None:
        torch = self._torch
        for s in [s for s in group if s.cancelled]:
            self._drop(s)
        group = [s for s in group if not s.done]
        if not group:
            return
        for s in group:
            self._start(s)
        n, width = len(group), max(len(s.prompt) for s in group)
        ids = torch.full((n, width), self._pad, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, s in enumerate(group):
            ids[i, width - len(s.prompt):] = torch.tensor(s.prompt, dtype=torch.long)
            mask[i, width - len(s.prompt):] = 1
        pos = (mask.cumsum(1) - 1).clamp_(min=0)
        from transformers import DynamicCache

        cache = DynamicCache()
        device = self.server.device
        logits = self._forward(ids.to(device), mask.to(device), pos.to(device), cache, group, last_only=True)
        _check_cache(cache)
        tokens = self._sample(logits, group)
        self._merge(group, cache, mask.to(device), tokens)
        for s, t in zip(group, tokens):
            self._accept(s, t)
        self.server.metrics.step(len(group), prefill_tokens=sum(len(s.prompt) for s in group))
        self._compact()

    def _decode(self) -> None:
        torch = self._torch
        rows = self._rows
        device = self._mask.device
        ids = torch.tensor(self._pending, dtype=torch.long, device=device)[:, None]
        pos = self._mask.sum(1, keepdim=True)
        self._mask = torch.cat([self._mask, torch.ones((len(rows), 1), dtype=self._mask.dtype, device=device)], 1)
        logits = self._forward(ids, self._mask, pos, self._cache, rows, last_only=False)
        tokens = self._sample(logits, rows)
        self._pending = tokens
        for s, t in zip(rows, tokens):
            self._accept(s, t)
        self.server.metrics.step(len(rows), decode_tokens=len(rows))
        self._compact()

    # -- the batch's cache ---------------------------------------------------------
    def _merge(self, group: list[Sequence], cache: Any, mask: Any, tokens: list[int]) -> None:
        torch = self._torch
        if not self._rows:
            self._rows, self._cache, self._mask, self._pending = list(group), cache, mask, list(tokens)
            return
        ta, tb = self._mask.shape[1], mask.shape[1]
        width = max(ta, tb)
        for la, lb in zip(self._cache.layers, cache.layers):
            la.keys = torch.cat([_pad_left(la.keys, width - ta), _pad_left(lb.keys, width - tb)], 0)
            la.values = torch.cat([_pad_left(la.values, width - ta), _pad_left(lb.values, width - tb)], 0)
        self._mask = torch.cat([_pad_left_2d(self._mask, width - ta), _pad_left_2d(mask, width - tb)], 0)
        self._rows.extend(group)
        self._pending.extend(tokens)

    def _compact(self) -> None:
        """Take finished rows out of the batch and cut columns that are padding for all."""
        if not self._rows:
            return
        keep = [i for i, s in enumerate(self._rows) if not s.done]
        if not keep:
            self._reset()
            return
        torch = self._torch
        if len(keep) < len(self._rows):
            idx = torch.tensor(keep, dtype=torch.long, device=self._mask.device)
            for layer in self._cache.layers:
                layer.keys = layer.keys.index_select(0, idx)
                layer.values = layer.values.index_select(0, idx)
            self._mask = self._mask.index_select(0, idx)
            self._rows = [self._rows[i] for i in keep]
            self._pending = [self._pending[i] for i in keep]
        first = int(self._mask.any(0).nonzero()[0])
        if first > 0:
            for layer in self._cache.layers:
                layer.keys = layer.keys[:, :, first:, :]
                layer.values = layer.values[:, :, first:, :]
            self._mask = self._mask[:, first:]

    def _reset(self) -> None:
        self._rows, self._cache, self._mask, self._pending = [], None, None, []


def _active_names(model: Any) -> list[str]:
    a = getattr(model, "active_adapter", None)
    return [a] if isinstance(a, str) else list(a or [])


def _pad_left(t: Any, n: int) -> Any:
    if n == 0:
        return t
    import torch

    return torch.cat([t.new_zeros((t.shape[0], t.shape[1], n, t.shape[3])), t], 2)


def _pad_left_2d(t: Any, n: int) -> Any:
    if n == 0:
        return t
    import torch

    return torch.cat([t.new_zeros((t.shape[0], n)), t], 1)


def _check_cache(cache: Any) -> None:
    from transformers.cache_utils import DynamicLayer

    bad = {type(layer).__name__ for layer in getattr(cache, "layers", ()) if type(layer) is not DynamicLayer}
    if bad or not getattr(cache, "layers", None):
        raise ServingError(f"the batched engine needs a plain key/value cache; this model uses {', '.join(sorted(bad)) or 'another kind'}"
                           " (serve it with --mode serial)", status=500, code="unsupported_model", type_="server_error")


class SerialEngine(_Engine):
    """One request at a time through ``model.generate`` (the server before batching)."""

    mode = "serial"

    def __init__(self, server: "ModelServer", *, max_queue: int = 256, **_: Any) -> None:
        self._current: Sequence | None = None
        super().__init__(server, max_batch_size=1, max_queue=max_queue, max_wait_ms=0)

    def _running(self) -> list[Sequence]:
        return [self._current] if self._current is not None else []

    def _run(self) -> None:
        while self._wait_for_work():
            with self._cv:
                if not self._waiting:
                    continue
                seq = self._waiting.popleft()
            if seq.cancelled:
                self._drop(seq)
                continue
            self._current = seq
            try:
                self._generate(seq)
            except Exception as exc:  # noqa: BLE001
                log_event("error", logging.ERROR, where="engine_generate", error=f"{type(exc).__name__}: {exc}", rows=1,
                          requests=[seq.rid], exc_info=True)
                self.server.metrics.error("engine_error")
                self._fail(seq, ServingError(f"generation failed: {type(exc).__name__}: {exc}", status=500,
                                             code="engine_error", type_="server_error"))
            finally:
                self._current = None

    def _generate(self, seq: Sequence) -> None:
        import contextlib

        import torch
        from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        engine = self

        class _Tokens(BaseStreamer):
            prompt_seen = False

            def put(self, value: Any) -> None:
                if not self.prompt_seen:  # generate hands over the prompt first
                    self.prompt_seen = True
                    return
                for t in value.reshape(-1).tolist():
                    engine._accept(seq, int(t))

            def end(self) -> None:
                pass

        class _Vocab(LogitsProcessor):
            def __call__(self, input_ids: Any, scores: Any) -> Any:
                scores[:, seq.codec.vocab:] = float("-inf")
                return scores

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kw: Any) -> Any:
                return torch.full((input_ids.shape[0],), seq.done or seq.cancelled, dtype=torch.bool,
                                  device=input_ids.device)

        self._start(seq)
        p = seq.params
        ids = torch.tensor([seq.prompt], dtype=torch.long, device=self.server.device)
        kwargs: dict[str, Any] = {
            "input_ids": ids, "attention_mask": torch.ones_like(ids), "max_new_tokens": p.max_tokens,
            "pad_token_id": self.server.tokenizer.pad_token_id, "eos_token_id": sorted(seq.eos),
            "streamer": _Tokens(), "stopping_criteria": StoppingCriteriaList([_Stop()]),
        }
        if seq.codec.vocab < self.server.vocab_rows():
            kwargs["logits_processor"] = LogitsProcessorList([_Vocab()])
        if p.temperature > 0:
            kwargs.update(do_sample=True, temperature=float(p.temperature), top_p=float(p.top_p), top_k=None)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with self.server.gate.step():
            model = self.server.model
            ctx: Any = contextlib.nullcontext()
            if model is not self.server.base:
                if seq.adapter is None:
                    ctx = model.disable_adapter()
                else:
                    model.set_adapter(seq.adapter)
            if p.temperature > 0:
                torch.manual_seed(p.seed if p.seed is not None else secrets.randbits(63))
            with ctx, torch.inference_mode():
                model.generate(**kwargs)
        self.server.metrics.step(1, prefill_tokens=len(seq.prompt), decode_tokens=len(seq.tokens))
        if seq.cancelled:
            self._drop(seq)
        elif not seq.done:
            self._finish(seq, "length" if len(seq.tokens) >= p.max_tokens else "stop")
