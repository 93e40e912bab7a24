"""A bounded load test on loopback: 2,000 requests over two adapters and the base, with
random max_tokens, some streamed, some sampled, some cancelled mid-stream.

No 5xx; every request answered exactly once (unique ids, one finish per choice, the
server's own request count); every greedy answer equals that model's answer alone;
afterwards nothing is left in the engine and the process's memory is back near its
level after warm-up.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import json
import random
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.serving.conftest import CHAT, PROMPTS, Reference, running, wait_until

REQUESTS = 2000
WARMUP = 200
CONCURRENCY = 48


def _rss() -> int:
    import psutil

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap pages back, as a long-running server would
    except OSError:
        pass
    return psutil.Process().memory_info().rss


def _jobs(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    jobs = []
    for i in range(n):
        kind = rng.choices(["greedy", "chat", "stream", "cancel", "sampled"], [50, 10, 20, 10, 10])[0]
        jobs.append({"i": i, "kind": kind, "model": rng.choice(["alpha", "beta", "base"]), "prompt": rng.choice(PROMPTS),
                     "max_tokens": rng.randint(1, 12), "seed": rng.randint(0, 10**6)})
    return jobs


async def _one(c: httpx.AsyncClient, job: dict) -> dict:
    chat = job["kind"] == "chat"
    body: dict[str, Any] = {"model": job["model"], "max_tokens": job["max_tokens"], "temperature": 0, "user": f"u{job['i']}"}
    if chat:
        body["messages"] = CHAT
    else:
        body["prompt"] = job["prompt"]
    if job["kind"] == "sampled":
        body.update(temperature=0.9, top_p=0.9, seed=job["seed"])
    url = "/v1/chat/completions" if chat else "/v1/completions"
    if job["kind"] in ("stream", "cancel"):
        body["stream"] = True
        body["max_tokens"] = max(body["max_tokens"], 8) if job["kind"] == "cancel" else body["max_tokens"]
        async with c.stream("POST", url, json=body) as r:
            out: dict[str, Any] = {"status": r.status_code, "ids": set(), "finishes": 0, "text": "", "done": False}
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    out["done"] = True
                    continue
                ev = json.loads(line[6:])
                assert "error" not in ev, ev
                out["ids"].add(ev["id"])
                ch = ev["choices"][0]
                out["text"] += ch.get("text", "")
                out["finishes"] += ch["finish_reason"] is not None
                if job["kind"] == "cancel" and ch.get("text"):
                    out["cancelled"] = True
                    break  # leave mid-stream: the connection closes, the server must free the slot
            return out
    r = await c.post(url, json=body)
    data = r.json()
    ch = data["choices"][0] if r.status_code == 200 else {}
    return {"status": r.status_code, "ids": {data.get("id")}, "finishes": 1 if ch.get("finish_reason") else 0,
            "text": ch.get("text", ch.get("message", {}).get("content")), "done": True,
            "usage": data.get("usage")}


async def _drive(url: str, jobs: list[dict]) -> list[dict]:
    sem = asyncio.Semaphore(CONCURRENCY)
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
        async def guarded(job: dict) -> dict:
            async with sem:
                return await _one(c, job)
        return await asyncio.gather(*(guarded(j) for j in jobs))


def _drive_elsewhere(url: str, n: int, seed: int) -> list[dict]:
    """Run the clients in another process: the server keeps this process's GIL to itself."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-m", "tests.serving.test_load", url, str(n), str(seed)], cwd=root,
                         capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout)
    for r in results:
        r["ids"] = set(r["ids"])
    return results


def test_two_thousand_requests(tiny_model_dir: Path, adapter_runs: dict[str, Path], reference: Reference) -> None:
    from tunesmith.serving.server import ModelServer, create_app

    server = ModelServer.from_paths(tiny_model_dir, {"alpha": adapter_runs["alpha"], "beta": adapter_runs["beta"]},
                                    max_batch_size=32, max_queue=4096, max_wait_ms=1)
    try:
        with running(create_app(server)) as url:
            _drive_elsewhere(url, WARMUP, seed=1)
            wait_until(lambda: server.inflight() == 0, what="warm-up to drain")
            threads0, rss0 = threading.active_count(), _rss()
            requests0 = sum(server.metrics.requests.values())

            jobs = _jobs(REQUESTS, seed=2)
            results = _drive_elsewhere(url, REQUESTS, seed=2)

            wait_until(lambda: server.inflight() == 0 and server.stats()["running"] == 0 and server.stats()["queued"] == 0,
                       timeout=30, what="the engine to empty")
            rss1 = _rss()
            seen = sum(server.metrics.requests.values()) - requests0
            statuses = {k[1]: v for k, v in server.metrics.requests.items()}
    finally:
        server.close()

    assert len(results) == REQUESTS
    assert all(r["status"] == 200 for r in results), sorted({r["status"] for r in results})
    assert not any(s.startswith("5") for s in statuses), statuses
    assert seen == REQUESTS  # the server answered each request once
    ids = [i for r in results for i in r["ids"]]
    assert len(ids) == len(set(ids)) == REQUESTS  # no response twice, none merged into another's
    greedy = 0
    for job, r in zip(jobs, results):
        if job["kind"] == "cancel":
            assert r.get("cancelled") or (r["done"] and r["finishes"] == 1), job
            continue
        assert r["done"] and r["finishes"] == 1, (job, r)
        if job["kind"] in ("greedy", "chat", "stream"):
            prompt = "<chat>" if job["kind"] == "chat" else job["prompt"]
            assert r["text"] == reference.text(job["model"], prompt, job["max_tokens"]), job
            greedy += 1
        if job["kind"] == "sampled":
            assert r["usage"]["completion_tokens"] <= job["max_tokens"]
    assert greedy > REQUESTS / 2 and sum(1 for r in results if r.get("cancelled")) > REQUESTS / 20
    assert threading.active_count() <= threads0 + 2
    assert rss1 - rss0 < 64 * 2**20, f"RSS grew by {(rss1 - rss0) / 2**20:.1f} MiB"


if __name__ == "__main__":  # the client side of the load test, in its own process
    import sys

    _url, _n, _seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    _res = asyncio.run(_drive(_url, _jobs(_n, _seed)))
    for _r in _res:
        _r["ids"] = sorted(_r["ids"])
    sys.stdout.write(json.dumps(_res))
