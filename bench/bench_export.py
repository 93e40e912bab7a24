"""Benchmark: merge and GGUF export of the default model (SmolLM2-135M-Instruct).

A LoRA adapter (r 8 on q/k/v/o, random weights) on the default model is exported:

* plain peft: ``PeftModel.from_pretrained`` + ``merge_and_unload`` + ``save_pretrained``
  (+ tokenizer) - the reference;
* tunesmith ``merged`` (which additionally compares logits before/after the merge),
  with and without that check;
* tunesmith ``gguf`` f16 and q8_0 (no plain-library counterpart is installed here:
  llama.cpp's converter is not; the ratio is against the plain merge).

Prints seconds and ratios, writes bench/results/bench_export.json. The CPU is shared:
run it with ``nice`` and read the numbers as measured under load.

    nice .venv/bin/python bench/bench_export.py [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_run(root: Path, base: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                      init_lora_weights=False))
    model.save_pretrained(root / "final", safe_serialization=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(root / "final")
    (root / "final" / "tunesmith.json").write_text(json.dumps({"base_model_dir": str(base), "peft": {"method": "lora"}}))
    return root


def plain_merge(run: Path, base: Path, out: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), run / "final")
    model.merge_and_unload().save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(run / "final").save_pretrained(out)


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()

    from tunesmith.core.export import export_run
    from tunesmith.core.models import convert_gguf
    from tunesmith.core.paths import default_gguf_path

    base = convert_gguf(default_gguf_path())
    tmp = Path(tempfile.mkdtemp(prefix="bench-export-"))
    try:
        run = make_run(tmp / "run", base)
        rows: dict[str, list[float]] = {k: [] for k in ("plain_merge", "merged", "merged_nocheck", "gguf_f16", "gguf_q8_0")}
        for i in range(args.repeat):
            rows["plain_merge"].append(timed(lambda: plain_merge(run, base, tmp / f"plain{i}")))
            rows["merged"].append(timed(lambda: export_run(run, "merged", tmp / f"m{i}")))
            rows["merged_nocheck"].append(timed(lambda: export_run(run, "merged", tmp / f"n{i}", options={"check": False})))
            rows["gguf_f16"].append(timed(lambda: export_run(run, "gguf", tmp / f"g{i}-f16.gguf", options={"type": "f16"})))
            rows["gguf_q8_0"].append(timed(lambda: export_run(run, "gguf", tmp / f"g{i}-q8.gguf", options={"type": "q8_0"})))
        sizes = {"merged_MB": sum(p.stat().st_size for p in (tmp / "m0").iterdir()) / 2**20,
                 "gguf_f16_MB": (tmp / "g0-f16.gguf").stat().st_size / 2**20,
                 "gguf_q8_0_MB": (tmp / "g0-q8.gguf").stat().st_size / 2**20}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    best = {k: min(v) for k, v in rows.items()}
    ref = best["plain_merge"]
    print(f"default model: {base.name} (best of {args.repeat}, seconds; CPU shared with other work)")
    for k, v in best.items():
        print(f"  {k:16s} {v:7.2f} s   x{v / ref:5.2f} of plain peft merge+save")
    for k, v in sizes.items():
        print(f"  {k:16s} {v:7.1f}")
    out = ROOT / "results" / "bench_export.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"seconds_best": best, "seconds_all": rows, "sizes": sizes,
                               "ratio_to_plain": {k: v / ref for k, v in best.items()}}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
