"""The machine's matmul peak at the default model's shapes, per dtype.

SmolLM2-135M (hidden 576, MLP 1536, k/v 192, vocabulary 49,152), a batch of
``--tokens`` rows (4 x 82 = 328 by default, the quickstart's batch): GFLOP/s of
``x @ W`` for each projection shape, fp32 and bf16, with ``torch.get_num_threads()``
threads (the best of ``--repeat`` timed 5-call loops after a warm-up: a peak). ``bench_train.py``
divides each variant's achieved model FLOP/s by the bf16 figure of the layer
shapes (``peak_bf16_gflops``) to print its distance to the limit.

    .venv/bin/python bench/bench_peak.py [--tokens 328] [--repeat 20]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

#: (name, in, out) of the default model's matmuls; the head is only run at labelled positions
SHAPES = [("q/o_proj", 576, 576), ("k/v_proj", 576, 192), ("gate/up_proj", 576, 1536), ("down_proj", 1536, 576),
          ("lm_head", 576, 49152)]
#: how often each layer shape occurs per token in one decoder layer (q, k, v, o, gate, up, down)
LAYER_MIX = {"q/o_proj": 2, "k/v_proj": 2, "gate/up_proj": 2, "down_proj": 1}


def gflops(m: int, k: int, n: int, dtype: str, repeat: int) -> float:
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    x = torch.randn(m, k).to(dt)
    w = torch.randn(k, n).to(dt)
    for _ in range(3):
        x @ w
    times = []
    for _ in range(repeat):  # the best of several 5-call loops: a peak, robust to a shared machine's preemption
        t = time.perf_counter()
        for _ in range(5):
            x @ w
        times.append((time.perf_counter() - t) / 5)
    return 2 * m * k * n / min(times) / 1e9


def measure(tokens: int = 328, repeat: int = 20, head: bool = True) -> dict:
    """``{"shapes": {name: {fp32, bf16}}, "peak_fp32_gflops", "peak_bf16_gflops"}``;
    the peaks are the FLOP-weighted harmonic means over one decoder layer's shapes
    (the output head is not part of them; ``head=False`` skips measuring it, which
    takes minutes in bf16 on a CPU that emulates bf16)."""
    import torch

    out: dict = {"tokens": tokens, "threads": torch.get_num_threads(), "shapes": {}}
    for name, k, n in SHAPES:
        if name == "lm_head" and not head:
            continue
        out["shapes"][name] = {d: round(gflops(tokens, k, n, d, repeat), 1) for d in ("fp32", "bf16")}
    for d in ("fp32", "bf16"):
        flops = {name: LAYER_MIX[name] * k * n for name, k, n in SHAPES if name in LAYER_MIX}
        total = sum(flops.values())
        out[f"peak_{d}_gflops"] = round(total / sum(f / out["shapes"][name][d] for name, f in flops.items()), 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=328)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--no-head", action="store_true", help="skip the output-head shape (not part of the layer peak)")
    args = ap.parse_args()
    res = measure(args.tokens, args.repeat, head=not args.no_head)
    print(f"matmul GFLOP/s, {args.tokens} tokens, {res['threads']} threads")
    print(f"{'shape':14s} {'fp32':>8s} {'bf16':>8s} {'bf16/fp32':>10s}")
    for name, v in res["shapes"].items():
        print(f"{name:14s} {v['fp32']:8.0f} {v['bf16']:8.0f} {v['bf16'] / v['fp32']:9.1f}x")
    print(f"decoder-layer peak: fp32 {res['peak_fp32_gflops']:.0f}, bf16 {res['peak_bf16_gflops']:.0f} GFLOP/s")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_peak.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
