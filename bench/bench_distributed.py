"""The same 2-process training under torchrun and on Ray Train, side by side.

A small Llama (built from a config, the real SmolLM2 tokenizer), LoRA r8 all-linear,
chat rows of varied length, ``--steps`` steps of ``--batch`` rows per process, fp32 on
CPU (gloo), one checkpoint in the middle. Each back-end runs the ``tunesmith train``
command in its own process tree, interleaved ``--repeat`` times:

* ``torchrun``: ``training.distributed.backend: torchrun`` (tunesmith starts
  ``torchrun --nproc_per_node=2``);
* ``ray``: ``--ray --num-workers 2``, a local Ray cluster started by the run
  (or ``--ray-address`` to join one that is already up: start-up without the cluster).

Columns: tokens/s *once started* (input tokens of both processes as the Trainer
counts them, ``num_input_tokens_seen`` in ``metrics.jsonl``, per second of the
Trainer's loop between the end of step 2 and the last step, so the first steps'
warm-up is not counted), the same over the whole loop,
and start-up (wall time of the command minus the training loop: processes,
imports, the Ray cluster and worker group, the model load, the final save).
Goal: Ray within 15% of torchrun once started. Writes bench/results/bench_distributed.json.

    nice .venv/bin/python bench/bench_distributed.py [--steps 40] [--repeat 2] [--hidden 256 --layers 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TUNESMITH = str(Path(sys.executable).parent / "tunesmith")
WORDS = ("the model reads a support ticket and answers with the team and the priority of the request "
         "so that the right people see it quickly and nobody waits longer than needed").split()


def rows(n: int) -> list[dict]:
    out = []
    for i in range(n):
        k = 4 + (i * 7) % 40
        out.append({"messages": [
            {"role": "user", "content": f"Ticket {i}: " + " ".join(WORDS[(i + j) % len(WORDS)] for j in range(k // 2 + 3))},
            {"role": "assistant", "content": " ".join(WORDS[(i * 3 + j) % len(WORDS)] for j in range(k))},
        ]})
    return out


def env() -> dict[str, str]:
    out = dict(os.environ, TUNESMITH_NO_PROGRESS="1", HF_HUB_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TUNESMITH_LAUNCHED"):
        out.pop(k, None)
    return out


def loop_rates(run: Path, skip: int = 2) -> tuple[float, float, float]:
    """(tokens/s after ``skip`` steps, tokens/s over the loop, loop seconds) from metrics.jsonl."""
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    recs = [r for r in recs if "num_input_tokens_seen" in r and "train_runtime" in r and "train_loss" not in r]
    first, last = recs[min(skip, len(recs) - 1) - 1], recs[-1]
    steady = (last["num_input_tokens_seen"] - first["num_input_tokens_seen"]) / max(last["train_runtime"] - first["train_runtime"], 1e-9)
    whole = last["num_input_tokens_seen"] / max(last["train_runtime"], 1e-9)
    return steady, whole, float(last["train_runtime"])


def run_once(backend: str, cfg: Path, run: Path, ray_address: str | None) -> dict:
    args = [TUNESMITH, "train", str(cfg), "--json"]
    if backend == "ray":
        args += ["--ray", "--num-workers", "2"]
        if ray_address:
            args += ["--set", f"training.distributed.address={ray_address}"]
    else:
        args += ["--set", "training.distributed.backend=torchrun", "--num-workers", "2"]
    t0 = time.time()
    proc = subprocess.run(args, env=env(), cwd=str(ROOT), capture_output=True, text=True, timeout=1800)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{backend} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout[proc.stdout.index("{\n"):])
    ranks = [json.loads(p.read_text()) for p in sorted((run / "ranks").glob("rank-*.json"))]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["steps"] == result["steps"] for r in ranks), ranks
    steady, whole, loop_s = loop_rates(run)
    launch = result.get("launch", {})
    return {"backend": backend, "wall_s": round(wall, 2), "loop_s": round(loop_s, 2),
            "startup_s": round(wall - loop_s, 2), "tokens": sum(r["tokens"] for r in ranks),
            "tokens_per_s": round(steady, 1), "tokens_per_s_whole_loop": round(whole, 1),
            "train_loss": result.get("train_loss"), "workers_up_s": launch.get("workers_up_s"),
            "connect_s": launch.get("connect_s")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting one per run")
    ap.add_argument("--only", nargs="*", choices=["torchrun", "ray"], default=["torchrun", "ray"])
    args = ap.parse_args()

    from tunesmith.testing import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="bench-dist-"))
    model = build_tiny_model(work / "model", hidden=args.hidden, layers=args.layers)
    data = work / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows(max(64, args.steps * args.batch * 2))), encoding="utf-8")
    results: dict[str, list[dict]] = {b: [] for b in args.only}
    for i in range(args.repeat):
        for backend in args.only:
            run = work / f"run-{backend}-{i}"
            cfg = work / f"{backend}-{i}.yaml"
            cfg.write_text(yaml.safe_dump({
                "model": {"source": "hf", "path": str(model)}, "data": {"path": str(data)},
                "peft": {"method": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear", "dropout": 0.05},
                "training": {"max_steps": args.steps, "batch_size": args.batch, "gradient_accumulation_steps": 1,
                             "max_length": args.max_length, "learning_rate": 2e-4, "logging_steps": 1,
                             "save_steps": args.steps // 2, "eval_steps": 0, "precision": "fp32",
                             "gradient_checkpointing": False, "report_to": [], "early_stopping": None,
                             "warmup_ratio": 0.0, "lr_scheduler": "constant"},
                "output_dir": str(run),
            }), encoding="utf-8")
            r = run_once(backend, cfg, run, args.ray_address)
            print(json.dumps(r), flush=True)
            results[backend].append(r)

    def med(backend: str, key: str) -> float:
        vals = [r[key] for r in results[backend] if r.get(key) is not None]
        return float(statistics.median(vals)) if vals else float("nan")

    print(f"\n2 processes, {args.steps} steps x {args.batch} rows each, max_length {args.max_length}, "
          f"Llama hidden {args.hidden} x {args.layers} layers, LoRA r8, fp32 CPU (gloo); median of {args.repeat}\n")
    print(f"{'back-end':<10} {'tokens/s (started)':>19} {'tokens/s (loop)':>16} {'loop s':>8} {'start-up s':>11} {'wall s':>8}")
    for b in args.only:
        print(f"{b:<10} {med(b, 'tokens_per_s'):>19.0f} {med(b, 'tokens_per_s_whole_loop'):>16.0f} "
              f"{med(b, 'loop_s'):>8.1f} {med(b, 'startup_s'):>11.1f} {med(b, 'wall_s'):>8.1f}")
    summary: dict = {"config": vars(args), "runs": results, "cpu_count": os.cpu_count(),
                     "load_avg_at_end": os.getloadavg()}
    if set(args.only) == {"torchrun", "ray"}:
        ratio = med("ray", "tokens_per_s") / med("torchrun", "tokens_per_s")
        summary["ray_over_torchrun_tokens_per_s"] = round(ratio, 3)
        print(f"\nRay / torchrun tokens/s once started: {ratio:.2f} (goal >= 0.85); "
              f"start-up: torchrun {med('torchrun', 'startup_s'):.0f}s, Ray {med('ray', 'startup_s'):.0f}s")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_distributed.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
