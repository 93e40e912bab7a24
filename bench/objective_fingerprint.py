"""Fingerprint every built-in objective on a tiny model with fixed seeds.

Trains sft, cpt, dpo, reward, grpo and ppo for a few steps each on a tiny Llama
built from a config (the real SmolLM2 tokenizer) and prints, per objective, the
logged per-step losses / rewards. Run it before and after a refactor of the
training code: the numbers must not move.

    python bench/objective_fingerprint.py --json out.json [--only sft dpo]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TUNESMITH_NO_PROGRESS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

CHAT = [
    {"messages": [{"role": "user", "content": f"What is {a} plus {b}?"}, {"role": "assistant", "content": f"{a + b}."}]}
    for a in range(1, 9) for b in range(1, 4)
]
TEXT = [{"text": f"Paragraph {i}: the quick brown fox number {i} jumps over {i * 3} lazy dogs."} for i in range(24)]
PAIRS = [
    {"prompt": f"What is {a} plus {b}?", "chosen": f"{a + b}.", "rejected": f"{a + b + 1}."}
    for a in range(1, 9) for b in range(1, 3)
]
PROMPTS = [{"prompt": f"Say something about topic {i}."} for i in range(8)]

KEYS = ("loss", "reward", "kl", "policy_loss", "eval_loss", "rewards/accuracies", "dpo/rewards/margins")


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def objective_config(objective: str, model_dir: Path, data: Path, out: Path) -> dict:
    training = {"max_steps": 4, "learning_rate": 1e-3, "batch_size": 4, "gradient_accumulation_steps": 1,
                "gradient_checkpointing": False, "save_steps": 0, "eval_steps": 0, "logging_steps": 1,
                "warmup_ratio": 0.0, "lr_scheduler": "constant", "report_to": [], "precision": "fp32",
                "max_length": 64, "seed": 7}
    cfg: dict = {
        "model": {"source": "hf", "path": str(model_dir)},
        "data": {"path": str(data)},
        "peft": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "training": training,
        "output_dir": str(out),
    }
    rl = {"rewards": [{"name": "regex", "pattern": "[xyzqjk]", "mode": "search"}], "max_new_tokens": 3,
          "temperature": 1.0, "batch_size": 8}
    if objective == "grpo":
        rl.update(num_generations=4)
    if objective == "ppo":
        rl.update(mini_batch_size=4, ppo_epochs=1)
    if objective in ("grpo", "ppo"):
        training["learning_rate"] = 1e-2
        cfg.update(_objective_section(objective, rl))
    else:
        cfg["objective"] = objective
    return cfg


def _objective_section(objective: str, rl: dict) -> dict:
    """The RL settings: an objective section (``objective: {name, ...}``) since the
    objectives became plugins; an ``rl:`` section before."""
    import tunesmith.core.config as c

    if "rl" in getattr(c.Config, "model_fields", {}):
        return {"objective": objective, "rl": rl}
    return {"objective": {"name": objective, **rl}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=["sft", "cpt", "dpo", "reward", "grpo", "ppo"])
    ap.add_argument("--json", type=Path, help="write the fingerprint here")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    import tunesmith
    from tunesmith.testing import build_tiny_model

    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_p = Path(tmp)
        model_dir = build_tiny_model(tmp_p / "model")
        data = {
            "sft": _write(tmp_p / "chat.jsonl", CHAT), "cpt": _write(tmp_p / "text.jsonl", TEXT),
            "dpo": _write(tmp_p / "pairs.jsonl", PAIRS), "reward": tmp_p / "pairs.jsonl",
            "grpo": _write(tmp_p / "prompts.jsonl", PROMPTS), "ppo": tmp_p / "prompts.jsonl",
        }
        for objective in args.only:
            run = tmp_p / f"run-{objective}"
            cfg = tunesmith.validate_config(objective_config(objective, model_dir, data[objective], run))
            from tunesmith.core.session import train

            result = train(cfg)
            rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
            curve = {k: [round(float(r[k]), 6) for r in rows if isinstance(r.get(k), (int, float))] for k in KEYS}
            out[objective] = {
                "steps": result.get("steps"),
                "train_loss": round(float(result["train_loss"]), 6) if "train_loss" in result else None,
                **{k: v for k, v in curve.items() if v},
            }
            print(objective, json.dumps(out[objective]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
