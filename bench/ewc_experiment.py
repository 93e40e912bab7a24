"""What EWC is for: sequential fine-tuning, task A then task B, with and without EWC.

    nice .venv/bin/python bench/ewc_experiment.py                 # the default model (slow on CPU)
    nice .venv/bin/python bench/ewc_experiment.py --model tiny    # the tiny test model (minutes)

Task A: addition ("What is 23 plus 45?" -> "68."). Task B: reversing a word
("Reverse the word: cat" -> "tac"). Both are chat data with a short system turn.
All runs are tunesmith runs (``tunesmith.core.training.train``) with full
fine-tuning, so task B starts from task A's saved model and "the start of
training" is exactly task A's weights:

1. A: fine-tune the base model on task A;
2. B plain: fine-tune A's model on task B;
3. B + EWC: the same, with ``losses: [causal_lm, {name: ewc, weight: lambda, data: task A}]``;
4. B + replay: task B data mixed with task A examples (ratio 0.1 of the mix);
5. B + L2-SP: the same with the plain L2 pull (``l2_sp``) for comparison.

Reported for every model: task-A held-out perplexity (assistant tokens), task-B
held-out perplexity and task-B exact match (greedy decoding). Results go to
``bench/results/ewc_experiment.json``. CPU numbers on a shared machine are noisy
in time, not in the metrics (fixed seeds).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TUNESMITH_NO_PROGRESS", "1")

ROOT = Path(__file__).resolve().parent.parent
SYSTEM = {"role": "system", "content": "Answer briefly."}
WORDS = (
    "apple river stone cloud tiger maple candle pocket silver garden window bottle yellow planet "
    "rocket pencil forest button dragon mirror basket castle jungle ladder marble orange pepper "
    "rabbit saddle tunnel velvet wallet anchor bridge cactus donkey eagle falcon guitar hammer "
    "island jacket kettle lemon magnet needle oyster parrot quartz ribbon shovel tomato umbrella "
    "violin walnut yogurt zipper banjo cobalt dolphin ember fabric glacier harbor igloo jigsaw"
).split()


def task_a(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        rows.append({"messages": [SYSTEM, {"role": "user", "content": f"What is {a} plus {b}?"},
                                  {"role": "assistant", "content": f"{a + b}."}]})
    return rows


def task_b(words: list[str]) -> list[dict]:
    return [{"messages": [SYSTEM, {"role": "user", "content": f"Reverse the word: {w}"},
                          {"role": "assistant", "content": w[::-1]}]} for w in words]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def make_data(work: Path, n_train: int, n_test: int) -> dict[str, str]:
    a_train, a_test = task_a(n_train, 1), task_a(n_test, 2)
    words = list(WORDS)
    random.Random(3).shuffle(words)
    split = max(8, len(words) * 3 // 4)
    b_train_words, b_test_words = words[:split], words[split:][:n_test]
    b_train = task_b(b_train_words * max(1, math.ceil(n_train / len(b_train_words))))[:n_train]
    b_test = task_b(b_test_words)
    # replay: task B data with task A examples making up 10% of the mix
    k = max(1, round(0.1 * len(b_train) / 0.9))
    mix = b_train + random.Random(4).sample(a_train, min(k, len(a_train)))
    random.Random(5).shuffle(mix)
    d = work / "data"
    return {
        "a_train": write_jsonl(d / "a_train.jsonl", a_train), "a_test": write_jsonl(d / "a_test.jsonl", a_test),
        "b_train": write_jsonl(d / "b_train.jsonl", b_train), "b_test": write_jsonl(d / "b_test.jsonl", b_test),
        "b_replay": write_jsonl(d / "b_replay.jsonl", mix),
    }


def make_cfg(name: str, model: dict, data: str, work: Path, args: argparse.Namespace, *, steps: int, lr: float,
             losses: list | None = None):
    import tunesmith

    cfg = {
        "name": name,
        "model": model,
        "data": {"path": data},
        "objective": "sft",
        "peft": {"method": "full"},
        "training": {
            "max_steps": steps, "learning_rate": lr, "batch_size": args.batch_size, "gradient_accumulation_steps": 1,
            "max_length": 64, "logging_steps": 5, "save_steps": 0, "eval_steps": 0, "warmup_ratio": 0.0,
            "gradient_checkpointing": False, "report_to": [], "early_stopping": None, "lr_scheduler": "constant",
            "precision": "fp32", "seed": 0,
        },
        "output_dir": str(work / "runs" / name),
    }
    if losses is not None:
        cfg["losses"] = losses
    return tunesmith.validate_config(cfg, registries=tunesmith.registry())


def load(run_or_model: str):
    from tunesmith.core.models import load_from_dir, load_trained

    p = Path(run_or_model)
    if (p / "final").exists():
        model, tok, _ = load_trained(p)
    else:
        model, tok = load_from_dir(p, dtype="float32")
    return model.eval(), tok


def evaluate(model, tok, test_file: str, *, generate: bool) -> dict:
    """Held-out perplexity over the assistant tokens and (optionally) greedy exact match."""
    import torch

    from tunesmith.core.data import load_records
    from tunesmith.core.render import render_chat, render_prompt

    records = load_records(test_file)
    nll, n_tok, exact = 0.0, 0, 0
    for rec in records:
        r = render_chat(tok, rec["messages"], completion_only=True, train_on_eos=False)
        ids = torch.tensor([r["input_ids"]])
        labels = torch.tensor([r["labels"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, :-1].float()
        tgt = labels[:, 1:]
        mask = tgt != -100
        logp = torch.log_softmax(logits, -1).gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        nll -= float(logp[mask].sum())
        n_tok += int(mask.sum())
        if generate:
            prompt = render_prompt(tok, rec["messages"][:-1])
            enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
            text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
            exact += int(text == rec["messages"][-1]["content"].strip())
    out = {"ppl": math.exp(nll / max(n_tok, 1))}
    if generate:
        out["exact_match"] = exact / len(records)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="default (SmolLM2-135M-Instruct) or tiny (the test model)")
    ap.add_argument("--steps-a", type=int, default=40)
    ap.add_argument("--steps-b", type=int, default=40)
    ap.add_argument("--lr-a", type=float, default=5e-5)
    ap.add_argument("--lr-b", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--ewc-weights", default="1000", help="comma-separated lambdas, one run each (the guide's 1000)")
    ap.add_argument("--ewc-batches", type=int, default=16)
    ap.add_argument("--l2-weight", type=float, default=1.0)
    ap.add_argument("--n-train", type=int, default=320)
    ap.add_argument("--n-test", type=int, default=24)
    ap.add_argument("--reuse-a", action="store_true", help="reuse WORK/runs/task_a when it has finished")
    ap.add_argument("--skip-base", action="store_true", help="do not evaluate the base model")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--variants", default="plain,ewc,replay,l2_sp")
    ap.add_argument("--work", default=str(ROOT / "bench" / "results" / "ewc_work"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ewc_experiment.json"))
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = make_data(work, args.n_train, args.n_test)
    if args.model == "tiny":
        from tunesmith.testing import build_tiny_model

        tiny = work / "tiny-model"
        if not (tiny / "config.json").exists():
            build_tiny_model(tiny, hidden=128, layers=2)
        base_model = {"source": "hf", "path": str(tiny)}
        base_dir = str(tiny)
    else:
        import tunesmith
        from tunesmith.core.config import ModelSection
        from tunesmith.core.models import resolve_model_dir

        base_model = {"source": "default"}
        base_dir = str(resolve_model_dir(ModelSection(), tunesmith.registry()))

    from tunesmith.core.session import train

    timings: dict[str, float] = {}
    results: dict[str, dict] = {}

    def record(label: str, path: str) -> None:
        model, tok = load(path)
        results[label] = {"task_a": evaluate(model, tok, data["a_test"], generate=False),
                          "task_b": evaluate(model, tok, data["b_test"], generate=True)}
        print(f"{label:>12}: A ppl {results[label]['task_a']['ppl']:.3f}  B ppl {results[label]['task_b']['ppl']:.3f}  "
              f"B exact {results[label]['task_b']['exact_match']:.2f}", flush=True)
        del model

    if not args.skip_base:
        record("base", base_dir)
    t = time.time()
    done_a = work / "runs" / "task_a" / "train_result.json"
    if args.reuse_a and done_a.exists():
        run_a = json.loads(done_a.read_text(encoding="utf-8"))
    else:
        run_a = train(make_cfg("task_a", base_model, data["a_train"], work, args, steps=args.steps_a, lr=args.lr_a))
    timings["task_a"] = time.time() - t
    record("after A", run_a["run_dir"])
    from_a = {"source": "hf", "path": str(Path(run_a["run_dir"]) / "final")}
    variants = {
        "plain": (data["b_train"], None),
        "replay": (data["b_replay"], None),
        "l2_sp": (data["b_train"], [{"name": "causal_lm"}, {"name": "l2_sp", "weight": args.l2_weight}]),
    }
    for lam in [float(x) for x in args.ewc_weights.split(",") if x.strip()]:
        variants[f"ewc_{lam:g}"] = (data["b_train"], [{"name": "causal_lm"}, {"name": "ewc", "weight": lam,
                                                         "data": data["a_train"], "batches": args.ewc_batches}])
    names = []
    for v in [s.strip() for s in args.variants.split(",") if s.strip()]:
        names += [k for k in variants if k.startswith("ewc_")] if v == "ewc" else [v]
    for v in names:
        path, losses = variants[v]
        t = time.time()
        run = train(make_cfg(f"task_b_{v}", from_a, path, work, args, steps=args.steps_b, lr=args.lr_b, losses=losses))
        timings[f"task_b_{v}"] = time.time() - t
        record(f"A->B {v}", run["run_dir"])

    print("\n| model | task-A held-out ppl | task-B held-out ppl | task-B exact match |")
    print("| --- | ---: | ---: | ---: |")
    for label, r in results.items():
        print(f"| {label} | {r['task_a']['ppl']:.3f} | {r['task_b']['ppl']:.3f} | {r['task_b']['exact_match']:.2f} |")
    out = {"model": args.model, "args": vars(args), "results": results, "timings_s": timings,
           "note": "measured on a shared, loaded CPU; the metrics use fixed seeds, the timings are noisy"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2), encoding="utf-8")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
