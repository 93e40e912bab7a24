"""Training throughput: tunesmith beside plain TRL SFTTrainer and a plain transformers Trainer.

Part 1 (padded batches): the default model (SmolLM2-135M-Instruct), the quickstart
data, LoRA r16 all-linear, the same max length, batch, steps and precision for all
three; real (non-padding) tokens per second and peak RSS for each, and the ratios.

``tunesmith`` is today's fp32 path; ``tunesmith-auto`` the new defaults
(``precision: auto`` - bf16 compute with the frozen base stored in bf16 where the
hardware multiplies bf16 natively - and ``compile: auto``);
``tunesmith-auto-compiled`` (``--only``) forces ``compile: on``, compile time
included; ``tunesmith-compiled`` (``--only``) the fp32 path with ``compile: on``;
``tunesmith-bf16`` (``--only``) forces ``precision: bf16`` whatever the
hardware (on a CPU without native bf16 it shows what emulated bf16 costs).
``--profile-step N`` prints the torch profiler's top ops (self CPU time) of
training step N of each variant. For each variant the table prints achieved model FLOP/s and its fraction
of the bf16 matmul peak at the model's layer shapes (``bench_peak.py``).

Part 2 (widely varied lengths): tunesmith with naive padded batches against
packing, padding-free batches and length-grouped batches.

All three draw the same batches (the same rows, the same sampler seed ``data_seed=42``
as tunesmith's ``training.seed``): the real-token counts printed for each must agree,
otherwise the comparison is off. Each uses its library's defaults otherwise
(tunesmith: the output head at labelled positions only, 16-bit CPU dropout masks,
transformers' default fused AdamW).

Every variant runs in its own child process (so peak RSS is its own); the parent
prints a table and writes bench/results/bench_train.json.

    nice .venv/bin/python bench/bench_train.py [--steps 10] [--batch 4] [--max-length 256] [--repeat 3]

On a machine with a CUDA GPU every variant trains there (the plain baselines get
``use_cpu=False``) and the table adds peak GPU memory; ``--precision bf16`` is the
GPU check: ``bench_train.py --precision bf16 --only transformers trl tunesmith``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TUNESMITH_NO_PROGRESS", "1")

#: model FLOPs per real token of a LoRA step on SmolLM2-135M: forward (2N) + input gradients (2N) of the
#: N = 106.2M non-embedding weights (frozen: no weight gradients); attention, LoRA and the head not counted
FLOPS_PER_TOKEN = 4 * 106.2e6

WORDS = ("the model reads a support ticket and answers with the team and the priority of the request "
         "so that the right people see it quickly and nobody waits longer than needed").split()


def varied_rows(n: int, seed: int = 0) -> list[dict]:
    """Chat rows whose lengths range from ~20 to ~max tokens (long-tailed)."""
    import random

    rnd = random.Random(seed)
    rows = []
    for i in range(n):
        k = int(4 + (rnd.random() ** 3) * 180)  # most short, some very long
        q = " ".join(rnd.choice(WORDS) for _ in range(max(2, k // 3)))
        a = " ".join(rnd.choice(WORDS) for _ in range(k))
        rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    return rows


def quickstart_rows() -> list[dict]:
    return [json.loads(l) for l in (ROOT / "examples" / "data" / "quickstart.jsonl").read_text().splitlines() if l.strip()]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class CountTokens:
    """Trainer mixin: count the real (non-padding) tokens of every batch the model trains on.

    Counted in ``compute_loss``, as tunesmith counts them: a collator wrapper would also
    count the batch the dataloader prefetches after the last step.
    """

    tokens = 0

    def compute_loss(self, model, inputs, *args, **kwargs):  # type: ignore[no-untyped-def]
        if model.training:
            mask = inputs.get("attention_mask")
            n = int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
            self.tokens += n
            self._clock().tick(n)
        return super().compute_loss(model, inputs, *args, **kwargs)

    def _clock(self):  # type: ignore[no-untyped-def]
        """tunesmith's own StepClock, so the plain baselines' steady rate is measured alike
        (it never reaches ``need``, so it writes no compile record)."""
        if getattr(self, "_bench_clock", None) is None:
            from tunesmith.core.compile import StepClock

            self._bench_clock = StepClock("bench-baseline", False, need=10**9)
        return self._bench_clock

    def steady_tokens_per_s(self) -> float | None:
        value = self._clock().steady_tokens_per_s()
        return round(value, 1) if value else None


def counted(trainer_cls: type) -> type:
    return type(f"Counted{trainer_cls.__name__}", (CountTokens, trainer_cls), {})


def lora_config(r: int):  # type: ignore[no-untyped-def]
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=2 * r, lora_dropout=0.05, target_modules="all-linear")


# --------------------------------------------------------------------------- variants (child process)
def run_tunesmith(args: argparse.Namespace, rows: list[dict], packing: object, *, precision: str | None = None,
                  compile_mode: str = "off") -> dict:
    import yaml

    import tunesmith
    from tunesmith.core.session import train

    tmp = Path(tempfile.mkdtemp(prefix="bench-ts-"))
    data = tmp / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg_path = tmp / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "model": {"source": "default", "dtype": "auto" if precision else "float32"},
        "data": {"path": str(data)},
        "peft": {"method": "lora", "r": args.r, "alpha": 2 * args.r, "dropout": 0.05, "target_modules": "all-linear"},
        "training": {"max_steps": args.steps, "batch_size": args.batch, "gradient_accumulation_steps": 1,
                     "learning_rate": 2e-4, "max_length": args.max_length, "precision": precision or args.precision, "packing": packing,
                     "compile": compile_mode,
                     "gradient_checkpointing": False, "logging_steps": args.steps, "save_steps": 0, "eval_steps": 0,
                     "report_to": [], "early_stopping": None, "warmup_ratio": 0.0},
        "output_dir": str(tmp / "run"),
    }))
    cfg = tunesmith.load_config(cfg_path)
    res = train(cfg, tunesmith.registry())
    return {"tokens": res["tokens"], "train_s": res["runtime_s"], "steady_tokens_per_s": res.get("steady_tokens_per_s")}


def _device_flags(args: argparse.Namespace) -> dict:
    """The same device and precision for the plain baselines as tunesmith's ``precision``."""
    import torch

    cuda = torch.cuda.is_available()
    return {"use_cpu": not cuda, "bf16": args.precision == "bf16", "fp16": False}


def _plain_model(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import tunesmith
    from tunesmith.core.config import ModelSection
    from tunesmith.core.models import resolve_model_dir

    path = resolve_model_dir(ModelSection(), tunesmith.registry())  # the cached default model folder
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return model, tok


def run_trl(args: argparse.Namespace, rows: list[dict]) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tok = _plain_model(args)
    ds = Dataset.from_list([{"messages": r["messages"]} for r in rows])
    cfg = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"), max_steps=args.steps, per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1, learning_rate=2e-4, max_length=args.max_length, **_device_flags(args),
        report_to=[], logging_steps=args.steps, save_strategy="no", gradient_checkpointing=False, packing=False,
        disable_tqdm=True, seed=42, data_seed=42, warmup_steps=0,
    )
    trainer = counted(SFTTrainer)(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=lora_config(args.r))
    t0 = time.time()
    trainer.train()
    return {"tokens": trainer.tokens, "train_s": round(time.time() - t0, 2), "steady_tokens_per_s": trainer.steady_tokens_per_s()}


def run_plain(args: argparse.Namespace, rows: list[dict]) -> dict:
    from peft import get_peft_model
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    model, tok = _plain_model(args)
    model = get_peft_model(model, lora_config(args.r))
    feats = [tok(tok.apply_chat_template(r["messages"], tokenize=False), add_special_tokens=False, truncation=True,
                 max_length=args.max_length) for r in rows]
    feats = [{"input_ids": f["input_ids"], "attention_mask": f["attention_mask"]} for f in feats]
    targs = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="bench-hf-"), max_steps=args.steps, per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1, learning_rate=2e-4, **_device_flags(args), report_to=[], logging_steps=args.steps,
        save_strategy="no", disable_tqdm=True, seed=42, data_seed=42, remove_unused_columns=False, warmup_steps=0,
    )
    trainer = counted(Trainer)(model=model, args=targs, train_dataset=feats,
                               data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    t0 = time.time()
    trainer.train()
    return {"tokens": trainer.tokens, "train_s": round(time.time() - t0, 2), "steady_tokens_per_s": trainer.steady_tokens_per_s()}


def child(name: str, args: argparse.Namespace) -> None:
    import torch

    torch.manual_seed(0)
    padded_rows = quickstart_rows()
    if name.endswith("-liger"):  # Liger's Triton kernels (RMSNorm, SwiGLU, RoPE) patched into transformers' Llama
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
        name = name[: -len("-liger")]
    varied = varied_rows(max(64, args.steps * args.batch * 2))
    if args.profile_step:
        profile_one_step(args.profile_step, name)
    if name == "tunesmith":
        out = run_tunesmith(args, padded_rows, False)
    elif name == "tunesmith-auto":  # the new defaults: precision auto (+ compile where it pays)
        out = run_tunesmith(args, padded_rows, False, precision="auto", compile_mode="auto")
    elif name == "tunesmith-bf16":  # bf16 forced (frozen base stored in bf16), whatever the hardware
        out = run_tunesmith(args, padded_rows, False, precision="bf16", compile_mode="off")
    elif name == "tunesmith-compiled":  # today's fp32 path with compile on (compile time included)
        out = run_tunesmith(args, padded_rows, False, compile_mode="on")
    elif name == "tunesmith-auto-compiled":  # precision auto and compile on (compile time included)
        out = run_tunesmith(args, padded_rows, False, precision="auto", compile_mode="on")
    elif name == "trl":
        out = run_trl(args, padded_rows)
    elif name == "transformers":
        out = run_plain(args, padded_rows)
    elif name.startswith("varied-"):
        mode = {"naive": False, "packing": True, "padding_free": "padding_free", "group_by_length": "group_by_length"}[name[7:]]
        out = run_tunesmith(args, varied, mode)
    else:
        raise SystemExit(f"unknown variant {name}")
    out["tokens_per_s"] = round(out["tokens"] / max(out["train_s"], 1e-9), 1)
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    if torch.cuda.is_available():
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print("BENCH-RESULT " + json.dumps(out), flush=True)


def profile_one_step(which: int, name: str) -> None:
    """torch profiler over training step ``which`` (forward + backward, the optimiser
    step excluded) of whatever trainer the variant runs: the top ops by self CPU time."""
    import torch
    import transformers

    orig = transformers.Trainer.training_step
    calls = {"n": 0}

    def training_step(self, *a, **kw):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] != which:
            return orig(self, *a, **kw)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            out = orig(self, *a, **kw)
        ka = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in ka)
        print(f"PROFILE {name}: step {which}, {total / 1e6:.2f} s self CPU time in all, torch threads {torch.get_num_threads()}")
        print("| op | self CPU s | share | calls |")
        print("| --- | --- | --- | --- |")
        for e in sorted(ka, key=lambda e: -e.self_cpu_time_total)[:12]:
            print(f"| `{e.key}` | {e.self_cpu_time_total / 1e6:.3f} | {100 * e.self_cpu_time_total / total:.1f}% | {e.count} |")
        # where the matmul time goes: aten::mm by input shapes (and dtype), with the GFLOP/s each achieves
        mm = [e for e in prof.key_averages(group_by_input_shape=True) if e.key == "aten::mm"]
        mm_total = sum(e.self_cpu_time_total for e in mm) or 1
        print(f"aten::mm by shape ({mm_total / 1e6:.2f} s in all):")
        print("| shapes | self CPU s | share of mm | calls | GFLOP/s |")
        print("| --- | --- | --- | --- | --- |")
        for e in sorted(mm, key=lambda e: -e.self_cpu_time_total)[:10]:
            shapes = e.input_shapes or []
            try:
                (m, k), (_, n) = shapes[0], shapes[1]
                gflops = f"{2 * m * k * n * e.count / max(e.self_cpu_time_total, 1) / 1e3:.0f}"
            except (ValueError, TypeError, IndexError):
                gflops = "-"
            print(f"| {shapes[:2]} | {e.self_cpu_time_total / 1e6:.3f} | {100 * e.self_cpu_time_total / mm_total:.1f}% "
                  f"| {e.count} | {gflops} |")
        sys.stdout.flush()
        return out

    transformers.Trainer.training_step = training_step


# --------------------------------------------------------------------------- parent
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--only", nargs="*", help="run only these variants")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="precision of the plain baselines and of the 'tunesmith' variant (today's fp32 path by default); "
                         "'tunesmith-auto' always runs precision: auto")
    ap.add_argument("--repeat", type=int, default=1, help="run every variant this many times (interleaved); report the median")
    ap.add_argument("--no-peak", action="store_true", help="skip the matmul peak measurement (fraction of peak)")
    ap.add_argument("--peak-json", help="take the peak from this bench_peak.py result (bench/results/bench_peak.json) instead of measuring it")
    ap.add_argument("--profile-step", type=int, default=0,
                    help="print the torch profiler's top ops of this training step (forward + backward) of every variant")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args)
        return
    variants = args.only or ["transformers", "trl", "tunesmith", "tunesmith-auto", "varied-naive", "varied-group_by_length",
                             "varied-padding_free", "varied-packing"]
    results: dict[str, dict] = {}
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for rep in range(args.repeat):  # interleaved, so a slow spell of the machine hits every variant
        for v in variants:
            cmd = [sys.executable, __file__, "--child", v, "--steps", str(args.steps), "--batch", str(args.batch),
                   "--max-length", str(args.max_length), "--r", str(args.r), "--precision", args.precision,
                   "--profile-step", str(args.profile_step)]
            print(f"running {v} ({rep + 1}/{args.repeat}) ...", flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
            line = next((l for l in proc.stdout.splitlines() if l.startswith("BENCH-RESULT ")), None)
            if proc.returncode != 0 or line is None:
                print(proc.stdout[-2000:], proc.stderr[-4000:])
                results[v] = {"error": (proc.stderr or proc.stdout)[-500:]}
                continue
            prof = [l for l in proc.stdout.splitlines() if l.startswith(("PROFILE ", "| "))]
            if prof:
                print("\n".join(prof), flush=True)
            runs[v].append(json.loads(line[len("BENCH-RESULT "):]))
            print(f"  {v}: {runs[v][-1]}", flush=True)
    for v, rs in runs.items():
        if rs and "error" not in results.get(v, {}):
            med = sorted(rs, key=lambda r: r["tokens_per_s"])[(len(rs) - 1) // 2]  # the median run (lower middle)
            results[v] = dict(med, runs_tokens_per_s=[r["tokens_per_s"] for r in rs])

    def tps(k: str) -> float:
        return float(results.get(k, {}).get("tokens_per_s") or 0.0)

    padded = {k: results[k].get("tokens") for k in ("transformers", "trl", "tunesmith") if k in results and "error" not in results[k]}
    if len(set(padded.values())) > 1:
        print(f"WARNING: the padded variants trained on different batches (real tokens {padded}); the ratios compare unlike work")
    ratios = {}
    if tps("tunesmith") and (tps("trl") or tps("transformers")):
        best_plain = max(tps("trl"), tps("transformers"))
        ratios["tunesmith_vs_best_plain"] = round(tps("tunesmith") / best_plain, 3)
        if tps("trl"):
            ratios["tunesmith_vs_trl"] = round(tps("tunesmith") / tps("trl"), 3)
        if tps("transformers"):
            ratios["tunesmith_vs_transformers"] = round(tps("tunesmith") / tps("transformers"), 3)
    if tps("tunesmith-auto"):
        if tps("tunesmith"):
            ratios["auto_vs_tunesmith_fp32"] = round(tps("tunesmith-auto") / tps("tunesmith"), 3)
        if tps("trl") or tps("transformers"):
            ratios["auto_vs_best_plain"] = round(tps("tunesmith-auto") / max(tps("trl"), tps("transformers")), 3)
    if tps("tunesmith-auto-compiled") and tps("tunesmith"):
        ratios["auto_compiled_vs_tunesmith_fp32"] = round(tps("tunesmith-auto-compiled") / tps("tunesmith"), 3)

    def steady(k: str) -> float:
        return float(results.get(k, {}).get("steady_tokens_per_s") or 0.0)

    # steps after the first (compile and warm-up excluded): what a long run approaches
    for k in ("tunesmith-auto", "tunesmith-auto-compiled"):
        if steady(k) and steady("tunesmith"):
            ratios[f"{k.replace('tunesmith-', '').replace('-', '_')}_steady_vs_tunesmith_fp32_steady"] = round(steady(k) / steady("tunesmith"), 3)
        if steady(k) and (steady("trl") or steady("transformers")):
            ratios[f"{k.replace('tunesmith-', '').replace('-', '_')}_steady_vs_best_plain_steady"] = round(steady(k) / max(steady("trl"), steady("transformers"), 1e-9), 3)
    if tps("varied-naive"):
        for m in ("packing", "padding_free", "group_by_length"):
            if tps(f"varied-{m}"):
                ratios[f"{m}_vs_naive"] = round(tps(f"varied-{m}") / tps("varied-naive"), 3)
        best = max(tps(f"varied-{m}") for m in ("packing", "padding_free", "group_by_length"))
        ratios["best_length_mode_vs_naive"] = round(best / tps("varied-naive"), 3)
    gpu = any("peak_gpu_mb" in v for v in results.values())
    peak = None
    if not gpu and args.peak_json:
        peak = json.loads(Path(args.peak_json).read_text())
    elif not gpu and not args.no_peak:  # the bf16 matmul peak at the model's layer shapes (bench_peak.py)
        sys.path.insert(0, str(ROOT / "bench"))
        from bench_peak import measure

        peak = measure(tokens=args.batch * 82, repeat=10)
    for v in results.values():
        if "error" not in v:
            v["model_gflops"] = round(v["tokens_per_s"] * FLOPS_PER_TOKEN / 1e9, 1)
            if peak:
                v["fraction_of_bf16_peak"] = round(v["model_gflops"] / peak["peak_bf16_gflops"], 4)
                v["fraction_of_fp32_peak"] = round(v["model_gflops"] / peak["peak_fp32_gflops"], 4)
    print("\nvariant                    real tokens/s  steady tok/s   train s   peak RSS MB   model GFLOP/s  of bf16 peak  of fp32 peak"
          + ("   peak GPU MB" if gpu else ""))
    for k, v in results.items():
        if "error" in v:
            print(f"{k:26s} ERROR")
        else:
            frac = f"{100 * v['fraction_of_bf16_peak']:11.1f}%" if "fraction_of_bf16_peak" in v else f"{'-':>12s}"
            frac += f"{100 * v['fraction_of_fp32_peak']:13.1f}%" if "fraction_of_fp32_peak" in v else f"{'-':>14s}"
            st = f"{v['steady_tokens_per_s']:13.1f}" if v.get("steady_tokens_per_s") else f"{'-':>13s}"
            print(f"{k:26s} {v['tokens_per_s']:13.1f} {st} {v['train_s']:9.1f} {v['peak_rss_mb']:13.0f} {v['model_gflops']:15.1f} {frac}"
                  + (f" {v.get('peak_gpu_mb', 0):13.0f}" if gpu else ""))
    if peak:
        print(f"matmul peak at the model's layer shapes ({peak['threads']} threads): fp32 {peak['peak_fp32_gflops']:.0f}, "
              f"bf16 {peak['peak_bf16_gflops']:.0f} GFLOP/s; model FLOPs = 4 x {FLOPS_PER_TOKEN / 4 / 1e6:.0f}M "
              "non-embedding parameters per real token (forward + input gradients of the frozen base)")
    for k, v in ratios.items():
        print(f"{k}: {v}x")
    load = os.getloadavg()
    print(f"(load average during the run: {load[0]:.1f}; numbers on a shared CPU are noisy)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"settings": vars(args) | {"model": "SmolLM2-135M-Instruct (default)", "lora": f"r{args.r} all-linear"},
           "results": results, "ratios": ratios, "peak": peak, "loadavg": load, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    (RESULTS / "bench_train.json").write_text(json.dumps(out, indent=2))
    print(f"wrote {RESULTS / 'bench_train.json'}")


if __name__ == "__main__":
    main()
