"""Benchmark: the adapter server on the default model at concurrency 1, 4 and 16.

The server (uvicorn in a thread on a free loopback port) holds SmolLM2-135M-Instruct
with two LoRA adapters; clients send /v1/completions requests spread over the two
adapters and the base (greedy, --max-tokens new tokens). Reference: the same
requests run in-process with plain peft (set_adapter + generate, one at a time, no
HTTP). Prints requests/s and p50/p95 latency per concurrency, the ratio to the
reference, and writes bench/results/bench_serve.json. CPU shared: run with ``nice``.

    nice .venv/bin/python bench/bench_serve.py [--requests 32] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = ["Write a haiku about the sea.", "What is the capital of France?", "Explain recursion briefly.",
           "List three fruits."]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()

    import httpx
    import torch
    import uvicorn

    from bench_export import make_run
    from tunesmith.core.models import convert_gguf
    from tunesmith.serving.server import ModelServer, create_app
    from tunesmith.core.paths import default_gguf_path

    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    base = convert_gguf(default_gguf_path())
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    adapters = {"a": make_run(tmp / "a", base), "b": make_run(tmp / "b", base)}
    server = ModelServer.from_paths(base, adapters)
    models = ["a", "b", "base"]
    jobs = [(models[i % 3], PROMPTS[i % len(PROMPTS)]) for i in range(args.requests)]

    # reference: plain peft in-process, sequential (after one warm-up generation; measured
    # before and after the server runs, the better one kept, as the shared CPU's load drifts)
    tok = server.tokenizer
    peft_model = server.model

    def reference() -> float:
        # run in one worker thread, as the server's generations do: the main thread's
        # OpenMP team is what a busy shared CPU slows down most, and that is not the library
        with ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(_reference).result()

    def _reference() -> float:
        import contextlib

        t0 = time.perf_counter()
        for m, p in jobs:
            ids = torch.tensor([tok(p)["input_ids"]])
            ctx = peft_model.disable_adapter() if m == "base" else contextlib.nullcontext()
            if m != "base":
                peft_model.set_adapter(m)
            with ctx, torch.inference_mode():
                peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_tokens,
                                    do_sample=False, pad_token_id=tok.pad_token_id)
        return len(jobs) / (time.perf_counter() - t0)

    with torch.inference_mode():
        ids = torch.tensor([tok(PROMPTS[0])["input_ids"]])
        peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                            pad_token_id=tok.pad_token_id)
    ref_rps = reference()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=uv.run, daemon=True)
    th.start()
    while not uv.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    results = {"reference_plain_peft_rps": ref_rps, "levels": {}}
    print(f"reference (plain peft, in-process, sequential): {ref_rps:.2f} req/s")
    try:
        for conc in (1, 4, 16):
            lat: list[float] = []

            def call(job):  # type: ignore[no-untyped-def]
                m, p = job
                with httpx.Client(base_url=url, timeout=600) as c:
                    t = time.perf_counter()
                    r = c.post("/v1/completions", json={"model": m, "prompt": p, "max_tokens": args.max_tokens, "temperature": 0})
                    r.raise_for_status()
                    lat.append(time.perf_counter() - t)

            t0 = time.perf_counter()
            with ThreadPoolExecutor(max_workers=conc) as pool:
                list(pool.map(call, jobs))
            wall = time.perf_counter() - t0
            row = {"rps": len(jobs) / wall, "p50_ms": 1000 * statistics.median(lat), "p95_ms": 1000 * pct(lat, 0.95)}
            row["ratio_to_reference"] = row["rps"] / ref_rps
            results["levels"][str(conc)] = row
            print(f"concurrency {conc:2d}: {row['rps']:.2f} req/s (x{row['ratio_to_reference']:.2f} of plain), "
                  f"p50 {row['p50_ms']:.0f} ms, p95 {row['p95_ms']:.0f} ms")
    finally:
        uv.should_exit = True
        th.join(30)
    ref_before = ref_rps
    ref_after = reference()
    print(f"reference again after the server runs: {ref_after:.2f} req/s")
    if ref_after > ref_rps:
        ref_rps = ref_after
        for row in results["levels"].values():
            row["ratio_to_reference"] = row["rps"] / ref_rps
    results["reference_plain_peft_rps"] = ref_rps
    results["reference_runs_rps"] = [ref_before, ref_after]
    print("ratios to the better reference: " + ", ".join(f"c{k}: x{v['ratio_to_reference']:.2f}" for k, v in results["levels"].items()))
    results.update(requests=len(jobs), max_tokens=args.max_tokens, note="CPU shared with other work")
    out = ROOT / "results" / "bench_serve.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
