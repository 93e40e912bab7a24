"""Benchmark: the adapter server on the default model, batched beside serial beside plain peft.

SmolLM2-135M-Instruct (the bundled default, offline) with two LoRA adapters (r 8,
all linear layers, random weights with non-zero B from two seeds, so the two really
differ). Clients send greedy /v1/completions requests spread over the two adapters
and the base at concurrency 1, 4, 16 and 32, to

* ``batched``: the server as shipped (continuous batching across adapters),
* ``serial``: the same server with ``mode: serial`` (one request at a time through
  ``model.generate``, the server before batching),

and the same requests run in-process with plain peft, one at a time (``set_adapter``
or ``disable_adapter`` + ``generate``, no HTTP). Every answer of both servers is
compared with plain peft's answer for its model and prompt; the table says how many
were identical. Prints requests/s and p50/p95 latency per level, the goals of
issue 15 (batched >= 4x serial at 16; batched p95 at 16 <= serial p95 at 4) and
writes bench/results/bench_serve.json. CPU shared: run with ``nice``.

    nice .venv/bin/python bench/bench_serve.py [--requests 32] [--max-tokens 16] [--levels 1 4 16 32]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI: spinning OpenMP waiters are ruinous on a shared CPU
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Iterator  # noqa: E402

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

PROMPTS = ["Write a haiku about the sea.", "What is the capital of France?", "Explain recursion briefly.",
           "List three fruits.", "The best way to learn a language is", "Once upon a time, a small robot"]
MODELS = ["a", "b", "base"]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def make_adapter(base: Path, out: Path, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False,
                                      lora_dropout=0.0))
    with torch.no_grad():  # A and B both random and non-zero: the adapter changes the answers
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.1)
    model.save_pretrained(out, safe_serialization=True)
    return out


def plain_peft(base: Path, adapters: dict[str, Path], jobs: list[tuple[str, str]], max_tokens: int) -> tuple[float, dict]:
    """Plain transformers + peft, one request at a time; returns (requests/s, answers)."""
    import contextlib

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.core.models import setup_tokenizer

    tok = setup_tokenizer(AutoTokenizer.from_pretrained(base), padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    names = list(adapters)
    model = PeftModel.from_pretrained(model, str(adapters[names[0]]), adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(str(adapters[n]), adapter_name=n)
    model.eval()
    answers: dict[tuple[str, str], str] = {}

    def gen(m: str, p: str) -> str:
        ids = torch.tensor([tok(p)["input_ids"]])
        ctx = model.disable_adapter() if m == "base" else contextlib.nullcontext()
        if m != "base":
            model.set_adapter(m)
        with ctx, torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    gen("a", PROMPTS[0])  # warm-up
    # one worker thread, as the servers generate: the main thread's OpenMP team is what
    # a busy shared CPU slows down most, and that is not the library
    with ThreadPoolExecutor(max_workers=1) as pool:
        t0 = time.perf_counter()
        for m, p in jobs:
            answers[(m, p)] = pool.submit(gen, m, p).result()
        rps = len(jobs) / (time.perf_counter() - t0)
    return rps, answers


@contextlib.contextmanager
def running(app: object) -> Iterator[str]:
    """uvicorn serving ``app`` in a thread on a free loopback port."""
    import socket
    import threading

    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    th = threading.Thread(target=uv.run, daemon=True)
    th.start()
    while not uv.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        uv.should_exit = True
        th.join(30)


def run_level(mode: str, url: str, conc: int, jobs: list[tuple[str, str]], args: argparse.Namespace, truth: dict) -> dict:
    import httpx

    lat: list[float] = []

    def call(job: tuple[str, str]) -> bool:
        m, p = job
        with httpx.Client(base_url=url, timeout=600) as c:
            t = time.perf_counter()
            r = c.post("/v1/completions", json={"model": m, "prompt": p, "max_tokens": args.max_tokens, "temperature": 0})
            r.raise_for_status()
            lat.append(time.perf_counter() - t)
            return r.json()["choices"][0]["text"] == truth[(m, p)]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=conc) as pool:
        same = sum(pool.map(call, jobs))
    wall = time.perf_counter() - t0
    row = {"rps": len(jobs) / wall, "p50_ms": 1000 * statistics.median(lat), "p95_ms": 1000 * pct(lat, 0.95),
           "requests": len(jobs), "identical": same, "loadavg": round(os.getloadavg()[0], 1)}
    print(f"  {mode:8s} concurrency {conc:2d}: {row['rps']:5.2f} req/s, p50 {row['p50_ms']:6.0f} ms, "
          f"p95 {row['p95_ms']:6.0f} ms, identical to plain peft {same}/{len(jobs)} (load {row['loadavg']})", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 32])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: every core)")
    ap.add_argument("--join-wait-ms", type=float, default=None,
                    help="the batched server's join_wait_ms (default: the server's default)")
    args = ap.parse_args()

    import torch

    from tunesmith.core.models import convert_gguf
    from tunesmith.core.paths import default_gguf_path

    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    base = convert_gguf(default_gguf_path())
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    adapters = {"a": make_adapter(base, tmp / "a", 1), "b": make_adapter(base, tmp / "b", 2)}
    jobs = [(MODELS[i % 3], PROMPTS[(i // 3) % len(PROMPTS)]) for i in range(args.requests)]

    print(f"plain peft, in-process, one request at a time ({len(jobs)} requests, {args.max_tokens} new tokens)...", flush=True)
    ref_rps, truth = plain_peft(base, adapters, jobs, args.max_tokens)
    differ = sum(1 for p in PROMPTS if (("a", p) in truth and ("b", p) in truth and ("base", p) in truth)
                 and len({truth[(m, p)] for m in MODELS}) == 3)
    assert differ, "the adapters do not change the answers"
    print(f"  plain peft: {ref_rps:.2f} req/s", flush=True)
    import httpx

    from tunesmith.serving.server import ModelServer, create_app

    results: dict = {"plain_peft_rps": ref_rps, "modes": {"serial": {}, "batched": {}}}
    servers = {"serial": ModelServer.from_paths(base, adapters, mode="serial"),
               "batched": ModelServer.from_paths(base, adapters, mode="batched", max_batch_size=max(args.levels),
                                                 **({} if args.join_wait_ms is None else {"join_wait_ms": args.join_wait_ms}))}
    try:
        with running(create_app(servers["serial"])) as s_url, running(create_app(servers["batched"])) as b_url:
            urls = {"serial": s_url, "batched": b_url}
            for url in urls.values():  # warm-up
                httpx.post(url + "/v1/completions", json={"model": "a", "prompt": PROMPTS[0], "max_tokens": 2}, timeout=600)
            # both servers at each level, one after the other (order alternating), so that
            # the shared CPU's drifting load affects both alike
            for k, conc in enumerate(args.levels):
                for mode in (("serial", "batched") if k % 2 == 0 else ("batched", "serial")):
                    results["modes"][mode][str(conc)] = run_level(mode, urls[mode], conc, jobs, args, truth)
    finally:
        for srv in servers.values():
            srv.close()
    ref_after, _ = plain_peft(base, adapters, jobs[: max(6, len(jobs) // 4)], args.max_tokens)
    results["plain_peft_rps_after"] = ref_after

    s, b = results["modes"]["serial"], results["modes"]["batched"]
    print(f"\n| concurrency | batched req/s | p50 / p95 ms | serial req/s | p50 / p95 ms | batched / serial | "
          f"batched / plain peft | identical (batched, serial) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for conc in map(str, args.levels):
        print(f"| {conc} | {b[conc]['rps']:.2f} | {b[conc]['p50_ms']:.0f} / {b[conc]['p95_ms']:.0f} | {s[conc]['rps']:.2f} | "
              f"{s[conc]['p50_ms']:.0f} / {s[conc]['p95_ms']:.0f} | {b[conc]['rps'] / s[conc]['rps']:.2f}x | "
              f"{b[conc]['rps'] / ref_rps:.2f}x | {b[conc]['identical']}/{b[conc]['requests']}, "
              f"{s[conc]['identical']}/{s[conc]['requests']} |")
    print(f"plain peft, one at a time: {ref_rps:.2f} req/s (again after the servers: {ref_after:.2f})")
    goals = {}
    if "16" in b and "16" in s:
        goals["batched_vs_serial_at_16"] = round(b["16"]["rps"] / s["16"]["rps"], 2)
        goals["speedup_goal_4x_met"] = goals["batched_vs_serial_at_16"] >= 4
    if "16" in b and "4" in s:
        goals["batched_p95_at_16_ms"] = round(b["16"]["p95_ms"])
        goals["serial_p95_at_4_ms"] = round(s["4"]["p95_ms"])
        goals["latency_goal_met"] = b["16"]["p95_ms"] <= s["4"]["p95_ms"]
    print("goals: " + ", ".join(f"{k} {v}" for k, v in goals.items()))
    identical = all(r["identical"] == r["requests"] for m in results["modes"].values() for r in m.values())
    print(f"every answer identical to plain peft: {identical}")
    load = os.getloadavg()
    print(f"(load average: {load[0]:.1f}; torch threads {torch.get_num_threads()}; numbers on a shared CPU are noisy)")
    results.update(goals=goals, identical=identical, requests=len(jobs), max_tokens=args.max_tokens,
                   adapters="two LoRA r8 all-linear, random non-zero A and B", loadavg=load,
                   torch_threads=torch.get_num_threads(), time=time.strftime("%Y-%m-%d %H:%M:%S"))
    out = ROOT / "results" / "bench_serve.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
