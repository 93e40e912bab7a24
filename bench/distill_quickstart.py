"""Distillation on the default model: the tuned quickstart model as the teacher.

    nice .venv/bin/python bench/distill_quickstart.py                      # trains the teacher too (slow on CPU)
    nice .venv/bin/python bench/distill_quickstart.py --teacher runs/quickstart --steps 24

1. Teacher: examples/quickstart.yaml as shipped (SmolLM2-135M-Instruct + LoRA, 80
   steps) through the whole pipeline, or an existing finished quickstart run
   (``--teacher``). Its data split (RUN/data) is the split for every model here.
2. Student: the base model with a fresh LoRA, ``objective: distill`` from the
   teacher run (forward KL over the teacher's token distributions at the answer
   tokens of the quickstart training split), ``--steps`` steps.
3. SFT: the same base, LoRA, data, steps and learning rate with ``objective: sft``.

Each is scored by the ``generation`` evaluator (greedy decoding, exact match) on the
same held-out test tickets (RUN/data/test.jsonl of the teacher's split). The numbers
go to bench/results/distill_quickstart.json. CPU time on a shared machine is noisy;
the metrics are not (fixed seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TUNESMITH_NO_PROGRESS", "1")

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
EVALUATION = [{"name": "generation", "limit": 20, "max_new_tokens": 24}]


def _metric(report: dict, name: str, which: str) -> float | None:
    """``exact_match`` (or another generation metric) of the ``base`` or ``tuned`` model in an eval report."""
    return ((report.get(which) or {}).get("generation") or {}).get("metrics", {}).get(name)


def _numbers(run: Path, kind: str) -> dict:
    """A finished student run's numbers (train_result.json + eval/report.json)."""
    result = json.loads((run / "train_result.json").read_text(encoding="utf-8"))
    report = json.loads((run / "eval" / "report.json").read_text(encoding="utf-8"))
    return {
        "objective": kind,
        "steps": result["steps"],
        "train_s": result.get("runtime_s"),
        "tokens_per_s": result.get("tokens_per_s"),
        "train_loss": result.get("train_loss"),
        "kl_first": result.get("kl_first"),
        "kl_last": result.get("kl_last"),
        "exact_match": _metric(report, "exact_match", "tuned"),
        "normalized_exact_match": _metric(report, "normalized_exact_match", "tuned"),
    }


def _quickstart(model: Path | None) -> dict:
    """examples/quickstart.yaml as a mapping; ``model``: an HF folder instead of the default model (a plumbing check)."""
    from tunesmith.core.config import read_yaml

    data, _ = read_yaml(QUICKSTART)
    data = json.loads(json.dumps(data))
    if model is not None:
        data["model"] = {"source": "hf", "path": str(model)}
    return data


def student(kind: str, teacher: Path, out: Path, steps: int, divergence: str, temperature: float,
            model: Path | None = None) -> dict:
    """Train and evaluate one student on the teacher's split; returns its numbers."""
    import tunesmith

    data = _quickstart(model)
    data["output_dir"] = str(out)
    data["data"]["path"] = str(teacher / "data" / "train.jsonl")
    data["training"].update(max_steps=steps, eval_steps=0, save_steps=0)
    data["evaluation"] = EVALUATION
    data["export"] = []
    data["registry"] = {"enabled": False}
    if kind == "distill":
        data["objective"] = {"name": "distill", "teacher": str(teacher), "divergence": divergence, "temperature": temperature}
    cfg = tunesmith.validate_config(data, source=str(QUICKSTART))
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(teacher / "data", out / "data")  # the same train/validation/test split as the teacher
    tunesmith.train(cfg)
    tunesmith.evaluate(cfg, compare_base=False)
    return _numbers(out, kind)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", type=Path, help="a finished quickstart run (default: train one)")
    ap.add_argument("--steps", type=int, default=24, help="student steps (distill and SFT)")
    ap.add_argument("--divergence", default="forward_kl", choices=["forward_kl", "reverse_kl", "jsd"])
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-distill")
    ap.add_argument("--report-only", action="store_true", help="re-read finished runs under --out, train nothing")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "distill_quickstart.json")
    ap.add_argument("--model", type=Path, help="an HF model folder instead of the default model (a quick plumbing check)")
    ap.add_argument("--teacher-steps", type=int, help="override the teacher's max_steps (default: the quickstart's 80)")
    args = ap.parse_args(argv)

    import tunesmith

    args.out.mkdir(parents=True, exist_ok=True)
    teacher = args.teacher
    t0 = time.time()
    if teacher is None and args.report_only:
        teacher = args.out / "teacher"
    if teacher is None:
        teacher = args.out / "teacher"
        data = _quickstart(args.model)
        if args.teacher_steps:
            data["training"]["max_steps"] = args.teacher_steps
        data["output_dir"] = str(teacher)
        data["evaluation"] = EVALUATION
        data["registry"] = {"enabled": False}
        data["data"]["path"] = str(ROOT / "examples" / "data" / "quickstart.jsonl")
        tunesmith.run(tunesmith.validate_config(data, source=str(QUICKSTART)))
    teacher = teacher.resolve()
    report_path = teacher / "eval" / "report.json"
    if not report_path.exists():
        print(f"{teacher} has no eval/report.json: run its evaluation first", file=sys.stderr)
        return 1
    t_report = json.loads(report_path.read_text(encoding="utf-8"))
    teacher_s = time.time() - t0
    rows = {
        "base": {"exact_match": _metric(t_report, "exact_match", "base"),
                 "normalized_exact_match": _metric(t_report, "normalized_exact_match", "base")},
        "teacher": {"steps": json.loads((teacher / "train_result.json").read_text())["steps"],
                    "exact_match": _metric(t_report, "exact_match", "tuned"),
                    "normalized_exact_match": _metric(t_report, "normalized_exact_match", "tuned")},
    }
    for kind in ("distill", "sft"):
        if args.report_only:
            rows[kind] = _numbers(args.out / kind, kind)
        else:
            rows[kind] = student(kind, teacher, args.out / kind, args.steps, args.divergence, args.temperature, args.model)
        print(kind, rows[kind], flush=True)
    out = {"teacher_run": str(teacher), "steps": args.steps, "divergence": args.divergence,
           "temperature": args.temperature, "test_prompts": 20, "teacher_wall_s": round(teacher_s, 1), "models": rows}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print("\n| model | steps | exact match | normalised exact match |\n| --- | --- | --- | --- |")
    for name, r in rows.items():
        print(f"| {name} | {r.get('steps', '-')} | {r['exact_match']} | {r['normalized_exact_match']} |")
    print(f"\nwrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
