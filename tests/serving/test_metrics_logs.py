"""/metrics in Prometheus text format (parsed with the reference parser) and the
structured log lines."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import httpx
import pytest

from tests.serving.conftest import CHAT, PROMPTS, running


def _families(text: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(fams: dict, family: str, sample: str, **labels: str) -> float:
    for s in fams[family].samples:
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise KeyError((sample, labels))


def test_metrics_and_structured_logs(tiny_model_dir: Path, adapter_runs: dict[str, Path],
                                     caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("prometheus_client")
    from tunesmith.serving.server import ModelServer, create_app

    caplog.set_level(logging.DEBUG, logger="tunesmith.serving")
    server = ModelServer.from_paths(tiny_model_dir, {"alpha": adapter_runs["alpha"]}, max_wait_ms=1)
    try:
        with running(create_app(server)) as url, httpx.Client(base_url=url, timeout=60) as c:
            usage = 0
            for p in PROMPTS[:3]:
                r = c.post("/v1/completions", json={"model": "alpha", "prompt": p, "max_tokens": 5, "temperature": 0})
                usage += r.json()["usage"]["completion_tokens"]
            r = c.post("/v1/chat/completions", json={"model": "base", "messages": CHAT, "max_tokens": 4, "stream": True})
            assert r.status_code == 200
            usage += 4
            assert c.post("/v1/chat/completions", json={"model": "alpha", "messages": [{"role": "wizard"}]}).status_code == 400
            assert c.post("/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404
            assert c.post("/v1/adapters", json={"name": "beta", "path": str(adapter_runs["beta"])}).status_code == 200
            assert c.delete("/v1/adapters/beta").status_code == 200
            rid = r.headers["x-request-id"]
            m = c.get("/metrics")
    finally:
        server.close()

    assert m.headers["content-type"].startswith("text/plain; version=0.0.4")
    fams = _families(m.text)
    assert _value(fams, "tunesmith_requests", "tunesmith_requests_total", endpoint="/v1/completions", status="200") == 3
    assert _value(fams, "tunesmith_requests", "tunesmith_requests_total", endpoint="/v1/completions", status="404") == 1
    assert _value(fams, "tunesmith_requests", "tunesmith_requests_total", endpoint="/v1/chat/completions", status="400") == 1
    assert _value(fams, "tunesmith_request_duration_seconds", "tunesmith_request_duration_seconds_count",
                  endpoint="/v1/completions") == 4
    inf = _value(fams, "tunesmith_request_duration_seconds", "tunesmith_request_duration_seconds_bucket",
                 endpoint="/v1/completions", le="+Inf")
    assert inf == 4
    gen = sum(s.value for s in fams["tunesmith_generation_tokens"].samples)
    assert gen == usage
    assert _value(fams, "tunesmith_queue_depth", "tunesmith_queue_depth") == 0
    assert _value(fams, "tunesmith_running_sequences", "tunesmith_running_sequences") == 0
    assert _value(fams, "tunesmith_tokens_per_second", "tunesmith_tokens_per_second") > 0
    assert _value(fams, "tunesmith_adapter_loads", "tunesmith_adapter_loads_total", result="ok") == 2
    assert _value(fams, "tunesmith_adapter_unloads", "tunesmith_adapter_unloads_total") == 1
    assert _value(fams, "tunesmith_time_to_first_token_seconds", "tunesmith_time_to_first_token_seconds_count") == 4

    records = [r for r in caplog.records if r.name == "tunesmith.serving" and getattr(r, "event", None)]
    reqs = [r.fields for r in records if r.event == "request"]
    ok = [f for f in reqs if f["path"] == "/v1/completions" and f["status"] == 200]
    assert len(ok) == 3 and all(f["adapter"] == "alpha" and f["completion_tokens"] == 5 and f["prompt_tokens"] > 0
                                and f["finish_reason"] == "length" and f["ms"] >= 0 and "ttft_ms" in f for f in ok)
    streamed = next(f for f in reqs if f["id"] == rid)
    assert streamed["stream"] is True and streamed["completion_tokens"] == 4
    bad = next(f for f in reqs if f["status"] == 400)
    assert bad["error_code"] == "invalid_request" and "wizard" in bad["error"]
    loads = [r.fields for r in records if r.event == "adapter_load"]
    assert [f["name"] for f in loads] == ["alpha", "beta"] and all(f["ok"] for f in loads)
    assert [r.fields["name"] for r in records if r.event == "adapter_unload"] == ["beta"]
    # the formatter writes each of them as one JSON object
    from tunesmith.serving.metrics import JsonFormatter

    line = json.loads(JsonFormatter().format(next(r for r in records if r.event == "request")))
    assert line["event"] == "request" and line["level"] in ("info", "debug") and "ts" in line and "status" in line


def test_failed_adapter_load_is_logged_and_counted(tiny_model_dir: Path, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    from tunesmith.serving.server import ModelServer, ServingError

    caplog.set_level(logging.INFO, logger="tunesmith.serving")
    with ModelServer.from_paths(tiny_model_dir) as server:
        with pytest.raises(Exception):
            server.load_adapter("ghost", tmp_path)
        with pytest.raises(ServingError):
            server.load_adapter("../bad", tmp_path)
        assert server.metrics.adapter_loads == {"error": 1}
    failed = [r.fields for r in caplog.records if getattr(r, "event", None) == "adapter_load"]
    assert failed and failed[0]["ok"] is False and "no PEFT adapter" in failed[0]["error"]


def test_engine_failure_is_a_500_an_error_line_and_a_count(tiny_model_dir: Path, adapter_runs: dict[str, Path],
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """A step that raises fails its requests with an OpenAI-style 500, logs one
    structured ``error`` line naming them, counts ``engine_error``, and the server
    goes on answering."""
    from tunesmith.serving.metrics import JsonFormatter
    from tunesmith.serving.server import ModelServer, create_app

    caplog.set_level(logging.INFO, logger="tunesmith.serving")
    server = ModelServer.from_paths(tiny_model_dir, {"alpha": adapter_runs["alpha"]}, max_wait_ms=1)
    real = server.engine._forward
    calls = {"n": 0}

    def broken(*a, **kw):  # the first forward fails, as a CUDA OOM or a bad kernel would
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected failure")
        return real(*a, **kw)

    server.engine._forward = broken
    try:
        with running(create_app(server)) as url, httpx.Client(base_url=url, timeout=60) as c:
            r = c.post("/v1/completions", json={"model": "alpha", "prompt": PROMPTS[0], "max_tokens": 3})
            assert r.status_code == 500
            body = r.json()["error"]
            assert body["code"] == "engine_error" and body["type"] == "server_error" and "injected failure" in body["message"]
            ok = c.post("/v1/completions", json={"model": "alpha", "prompt": PROMPTS[0], "max_tokens": 3})
            assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
            fams = _families(c.get("/metrics").text)
    finally:
        server.close()
    assert _value(fams, "tunesmith_errors", "tunesmith_errors_total", code="engine_error") >= 1
    errors = [r for r in caplog.records if getattr(r, "event", None) == "error"]
    assert len(errors) == 1 and errors[0].levelno == logging.ERROR
    line = json.loads(JsonFormatter().format(errors[0]))
    assert line["where"] == "engine_step" and "injected failure" in line["error"] and line["rows"] == 1
    assert line["requests"] == [r.headers["x-request-id"]] and "Traceback" in line["exception"]
    failed = [x.fields for x in caplog.records if getattr(x, "event", None) == "request" and x.fields["status"] == 500]
    assert len(failed) == 1 and failed[0]["error_code"] == "engine_error"
