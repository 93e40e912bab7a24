"""Prometheus metrics (text exposition format 0.0.4) and structured log lines for the server.

No client library: the server keeps a few counters, gauges and histograms under one
lock and renders them on ``GET /metrics``. Log lines are JSON objects, one per line,
on the ``tunesmith.serving`` logger: ``{"ts", "level", "event", ...fields}`` with
``event`` one of ``request``, ``adapter_load``, ``adapter_unload``, ``error``,
``startup``.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import deque
from typing import Any, Callable, Iterable

log = logging.getLogger("tunesmith.serving")

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
#: the window ``tunesmith_tokens_per_second`` averages over
RATE_WINDOW_S = 10.0


def log_event(event: str, level: int = logging.INFO, **fields: Any) -> None:
    """One structured line: ``event`` plus ``fields`` (see :class:`JsonFormatter`)."""
    exc_info = fields.pop("exc_info", False)
    if log.isEnabledFor(level):
        log.log(level, event, extra={"event": event, "fields": fields}, exc_info=exc_info)


class JsonFormatter(logging.Formatter):
    """Formats records as one JSON object per line; records from :func:`log_event`
    carry their fields, any other record its message (and exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name}
        event = getattr(record, "event", None)
        if event:
            out["event"] = event
            out.update(getattr(record, "fields", {}) or {})
        else:
            out["event"] = "log"
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def configure_logging(level: str = "info") -> None:
    """Send the server's structured lines to stderr (once; idempotent)."""
    logger = logging.getLogger("tunesmith.serving")
    logger.setLevel(getattr(logging, level.upper(), logging.INFO))
    if not any(getattr(h, "_tunesmith_json", False) for h in logger.handlers):
        h = logging.StreamHandler()
        h.setFormatter(JsonFormatter())
        h._tunesmith_json = True  # type: ignore[attr-defined]
        logger.addHandler(h)
        logger.propagate = False


class _Histogram:
    __slots__ = ("buckets", "counts", "sum", "count")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.sum += v
        self.count += 1
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
                break


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    items = [f'{k}="{_escape(str(v))}"' for k, v in pairs]
    return "{" + ",".join(items) + "}" if items else ""


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if float(v).is_integer():
        return str(int(v))
    return repr(float(v))


class Metrics:
    """What ``/metrics`` reports. Gauges that belong to the engine are read through
    ``gauges`` callbacks at render time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started = time.time()
        self.requests: dict[tuple, int] = {}  # (endpoint, status) -> n
        self.latency: dict[str, _Histogram] = {}  # endpoint -> seconds
        self.ttft = _Histogram(LATENCY_BUCKETS)
        self.queue_wait = _Histogram(LATENCY_BUCKETS)
        self.prompt_tokens: dict[str, int] = {}  # model -> n
        self.generation_tokens: dict[str, int] = {}
        self.finished: dict[str, int] = {}  # finish_reason -> sequences
        self.errors: dict[str, int] = {}  # code -> n
        self.adapter_loads: dict[str, int] = {}  # result -> n
        self.adapter_unloads = 0
        self.steps = 0
        self.batch_rows = _Histogram((1, 2, 4, 8, 16, 32, 64, 128, 256))
        self._recent_tokens: deque[tuple[float, int]] = deque()
        self._recent_done: deque[float] = deque()
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    # -- recording -----------------------------------------------------------
    def request(self, endpoint: str, status: int, seconds: float | None = None) -> None:
        with self._lock:
            key = (endpoint, str(status))
            self.requests[key] = self.requests.get(key, 0) + 1
            if seconds is not None:
                self.latency.setdefault(endpoint, _Histogram(LATENCY_BUCKETS)).observe(seconds)

    def sequence(self, model: str, prompt_tokens: int, completion_tokens: int, finish_reason: str,
                 ttft: float | None, queue_wait: float | None) -> None:
        now = time.monotonic()
        with self._lock:
            self.prompt_tokens[model] = self.prompt_tokens.get(model, 0) + prompt_tokens
            self.generation_tokens[model] = self.generation_tokens.get(model, 0) + completion_tokens
            self.finished[finish_reason] = self.finished.get(finish_reason, 0) + 1
            if ttft is not None:
                self.ttft.observe(ttft)
            if queue_wait is not None:
                self.queue_wait.observe(queue_wait)
            self._recent_done.append(now)
            self._trim(now)

    def step(self, rows: int, *, prefill_tokens: int = 0, decode_tokens: int = 0) -> None:
        now = time.monotonic()
        with self._lock:
            self.steps += 1
            self.batch_rows.observe(rows)
            if decode_tokens or prefill_tokens:
                # every row of a prefill also produced its first token
                self._recent_tokens.append((now, decode_tokens or rows))
            self._trim(now)

    def error(self, code: str | None) -> None:
        with self._lock:
            k = code or "unknown"
            self.errors[k] = self.errors.get(k, 0) + 1

    def adapter_load(self, result: str) -> None:
        with self._lock:
            self.adapter_loads[result] = self.adapter_loads.get(result, 0) + 1

    def adapter_unload(self) -> None:
        with self._lock:
            self.adapter_unloads += 1

    def _trim(self, now: float) -> None:
        while self._recent_tokens and now - self._recent_tokens[0][0] > RATE_WINDOW_S:
            self._recent_tokens.popleft()
        while self._recent_done and now - self._recent_done[0] > RATE_WINDOW_S:
            self._recent_done.popleft()

    # -- reading -----------------------------------------------------------------
    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            n = sum(k for _, k in self._recent_tokens)
        return n / RATE_WINDOW_S

    def retry_after(self, queued: int) -> int:
        """Seconds a rejected client should wait: the queue over the recent completion rate."""
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            rate = len(self._recent_done) / RATE_WINDOW_S
        if rate <= 0:
            return 1
        return int(min(60, max(1, math.ceil(queued / rate))))

    def render(self) -> str:
        lines: list[str] = []

        def head(name: str, kind: str, help_: str) -> None:
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")

        def hist(name: str, h: _Histogram, labels: tuple = ()) -> None:
            acc = 0
            for b, c in zip(h.buckets, h.counts):
                acc += c
                lines.append(f"{name}_bucket{_labels((*labels, ('le', _num(b))))} {acc}")
            lines.append(f"{name}_bucket{_labels((*labels, ('le', '+Inf')))} {h.count}")
            lines.append(f"{name}_sum{_labels(labels)} {_num(h.sum)}")
            lines.append(f"{name}_count{_labels(labels)} {h.count}")

        tps = self.tokens_per_second()
        gauges = {k: (h, fn()) for k, (h, fn) in self.gauges.items()}
        with self._lock:
            head("tunesmith_requests_total", "counter", "HTTP requests answered, by endpoint and status code.")
            for (ep, st), n in sorted(self.requests.items()):
                lines.append(f"tunesmith_requests_total{_labels((('endpoint', ep), ('status', st)))} {n}")
            head("tunesmith_request_duration_seconds", "histogram",
                 "Time from receiving a generation request to the end of its response.")
            for ep, h in sorted(self.latency.items()):
                hist("tunesmith_request_duration_seconds", h, (("endpoint", ep),))
            head("tunesmith_time_to_first_token_seconds", "histogram", "Time from submission to a sequence's first token.")
            hist("tunesmith_time_to_first_token_seconds", self.ttft)
            head("tunesmith_queue_wait_seconds", "histogram", "Time a sequence waited before joining the batch.")
            hist("tunesmith_queue_wait_seconds", self.queue_wait)
            head("tunesmith_prompt_tokens_total", "counter", "Prompt tokens processed, by model.")
            for m, n in sorted(self.prompt_tokens.items()):
                lines.append(f"tunesmith_prompt_tokens_total{_labels((('model', m),))} {n}")
            head("tunesmith_generation_tokens_total", "counter", "Tokens generated, by model.")
            for m, n in sorted(self.generation_tokens.items()):
                lines.append(f"tunesmith_generation_tokens_total{_labels((('model', m),))} {n}")
            head("tunesmith_sequences_finished_total", "counter", "Sequences finished, by finish reason.")
            for r, n in sorted(self.finished.items()):
                lines.append(f"tunesmith_sequences_finished_total{_labels((('finish_reason', r),))} {n}")
            head("tunesmith_tokens_per_second", "gauge", f"Tokens generated per second over the last {RATE_WINDOW_S:g} s.")
            lines.append(f"tunesmith_tokens_per_second {_num(round(tps, 3))}")
            for name, (help_, value) in sorted(gauges.items()):
                head(name, "gauge", help_)
                lines.append(f"{name} {_num(value)}")
            head("tunesmith_engine_steps_total", "counter", "Forward passes of the generation engine.")
            lines.append(f"tunesmith_engine_steps_total {self.steps}")
            head("tunesmith_batch_rows", "histogram", "Sequences in each forward pass.")
            hist("tunesmith_batch_rows", self.batch_rows)
            head("tunesmith_errors_total", "counter", "Errors answered or raised, by code.")
            for c, n in sorted(self.errors.items()):
                lines.append(f"tunesmith_errors_total{_labels((('code', c),))} {n}")
            head("tunesmith_adapter_loads_total", "counter", "Adapter loads, by result.")
            for r, n in sorted(self.adapter_loads.items()):
                lines.append(f"tunesmith_adapter_loads_total{_labels((('result', r),))} {n}")
            head("tunesmith_adapter_unloads_total", "counter", "Adapters unloaded.")
            lines.append(f"tunesmith_adapter_unloads_total {self.adapter_unloads}")
            head("tunesmith_uptime_seconds", "gauge", "Seconds since the server started.")
            lines.append(f"tunesmith_uptime_seconds {_num(round(time.time() - self.started, 3))}")
        return "\n".join(lines) + "\n"
