#!/usr/bin/env bash
# FSDP2 + LoRA through tunesmith on GPUs: the check that cannot run on CPU (accelerate
# enables FSDP only on accelerator devices; on CPU tunesmith refuses the launch).
#
#   bash scripts/gpu/fsdp2_lora.sh             # 2 processes when 2 GPUs are visible, else 1
#   NPROC=2 STEPS=20 bash scripts/gpu/fsdp2_lora.sh
#   DRY_RUN=1 bash scripts/gpu/fsdp2_lora.sh    # no GPU: write the configs, check accelerate and tunesmith accept them
#
# What it does, with one seed and one small Llama built from a config (hidden 512,
# 4 layers, the real SmolLM2 tokenizer; no download):
#   1. DDP reference: `torchrun --nproc_per_node=N tunesmith train` (fp32);
#   2. FSDP2: `accelerate launch --config_file fsdp2.yaml tunesmith train` (fsdp_version 2,
#      TRANSFORMER_BASED_WRAP, FULL_STATE_DICT, fp32), the same config;
#   3. checks: both exit 0 within TIMEOUT (a rank-0-only gather at the final save would
#      hang here), RUN/ranks/launch-N.json says the Trainer ran FSDP (not DDP), every rank
#      trained, one checkpoint set and one final adapter that loads, and the FSDP losses
#      follow the DDP ones (|difference| < 1e-3 per step: same data order and
#      token-weighted loss; only the reduction order differs).
# Prints one line per check and `fsdp2 lora: ok` at the end; exit status 1 on the first
# failure. Output of everything under ${OUT:-/tmp/fsdp2-lora}.
#
# Needs: a CUDA build of torch and tunesmith's dependencies for $PY (PY=python3 with
# PYTHONPATH=. on a machine whose image has torch/transformers/accelerate/peft; carry
# the missing wheels: trl, pydantic, datasets, gguf, platformdirs, ...).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
STEPS=${STEPS:-12}
TIMEOUT=${TIMEOUT:-400}
WORK=${OUT:-/tmp/fsdp2-lora}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TUNESMITH_NO_PROGRESS=1 PYTHONUNBUFFERED=1
mkdir -p "$WORK"
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [ "${DRY_RUN:-0}" = 1 ]; then
  NPROC=${NPROC:-2}; echo "dry run: writing and validating the configs only (GPUs visible: $NGPU)"
else
  if [ "$NGPU" -lt 1 ]; then echo "no CUDA GPU visible: this is the FSDP2 GPU check (DRY_RUN=1 checks the configs only)"; exit 1; fi
  NPROC=${NPROC:-$(( NGPU >= 2 ? 2 : 1 ))}
fi
echo "GPUs: $NGPU, processes: $NPROC, steps: $STEPS"

"$PY" - "$WORK" "$STEPS" "$NPROC" <<'PY'
import json, sys
from pathlib import Path
import yaml
from tunesmith.testing import build_tiny_model, TINY_CHAT
work, steps, nproc = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
model = work / "model"
if not (model / "config.json").exists():
    build_tiny_model(model, hidden=512, layers=4)
(work / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TINY_CHAT * 4))
for name in ("ddp", "fsdp2"):
    (work / f"{name}.yaml").write_text(yaml.safe_dump({
        "model": {"source": "hf", "path": str(model)}, "data": {"path": str(work / "chat.jsonl")},
        "peft": {"method": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear", "dropout": 0.0},
        "training": {"max_steps": steps, "batch_size": 4, "gradient_accumulation_steps": 1, "max_length": 128,
                     "learning_rate": 1e-3, "logging_steps": 1, "save_steps": steps // 2, "eval_steps": 0,
                     "precision": "fp32", "gradient_checkpointing": False, "report_to": [], "early_stopping": None,
                     "warmup_ratio": 0.0, "lr_scheduler": "constant", "compile": "off"},
        "output_dir": str(work / f"run-{name}"),
    }))
(work / "accelerate-fsdp2.yaml").write_text(yaml.safe_dump({
    "compute_environment": "LOCAL_MACHINE", "distributed_type": "FSDP", "num_machines": 1, "machine_rank": 0,
    "num_processes": nproc, "mixed_precision": "no", "use_cpu": False,
    "fsdp_config": {"fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                    "fsdp_state_dict_type": "FULL_STATE_DICT", "fsdp_cpu_ram_efficient_loading": False,
                    "fsdp_reshard_after_forward": True, "fsdp_activation_checkpointing": False},
}))
PY
# the config may predate training.compile: drop keys this checkout does not know
"$PY" - "$WORK" <<'PY'
import sys, yaml
from pathlib import Path
from tunesmith.core.config import TrainingSection
for name in ("ddp", "fsdp2"):
    p = Path(sys.argv[1]) / f"{name}.yaml"
    d = yaml.safe_load(p.read_text())
    d["training"] = {k: v for k, v in d["training"].items() if k in TrainingSection.model_fields}
    p.write_text(yaml.safe_dump(d))
PY
# the configs are what accelerate and tunesmith accept (accelerate's own config loader)
"$PY" - "$WORK" "$NPROC" <<'PY'
import sys
from pathlib import Path
from accelerate.commands.config.config_args import load_config_from_file
import tunesmith
work, nproc = Path(sys.argv[1]), int(sys.argv[2])
acc = load_config_from_file(str(work / "accelerate-fsdp2.yaml"))
assert type(acc).__name__ == "ClusterConfig" and str(acc.distributed_type).endswith("FSDP"), acc
assert acc.num_processes == nproc and acc.fsdp_config["fsdp_version"] == 2 and not acc.use_cpu, acc
print(f"ok   accelerate reads accelerate-fsdp2.yaml: {acc.distributed_type}, {acc.num_processes} processes, "
      f"fsdp_version {acc.fsdp_config['fsdp_version']}, use_cpu {acc.use_cpu}")
for name in ("ddp", "fsdp2"):
    cfg = tunesmith.load_config(work / f"{name}.yaml")
    print(f"ok   tunesmith reads {name}.yaml: {cfg.objective.name if hasattr(cfg.objective, 'name') else cfg.objective}, "
          f"peft {cfg.peft.method}, {cfg.training.max_steps} steps")
PY
if [ "${DRY_RUN:-0}" = 1 ]; then echo "dry run: configs ok in $WORK"; exit 0; fi
rm -rf "$WORK/run-ddp" "$WORK/run-fsdp2"
echo "== DDP reference (torchrun, $NPROC processes)"
timeout "$TIMEOUT" "$PY" -m torch.distributed.run --nproc-per-node="$NPROC" --master-port=29571 -m tunesmith train "$WORK/ddp.yaml" \
  > "$WORK/ddp.log" 2>&1 || { tail -40 "$WORK/ddp.log"; echo "FAIL: DDP run"; exit 1; }
echo "== FSDP2 (accelerate launch, $NPROC processes)"
timeout "$TIMEOUT" "$PY" -m accelerate.commands.launch --config_file "$WORK/accelerate-fsdp2.yaml" --main_process_port 29572 \
  -m tunesmith train "$WORK/fsdp2.yaml" > "$WORK/fsdp2.log" 2>&1 || {
  rc=$?; tail -60 "$WORK/fsdp2.log"; [ "$rc" = 124 ] && echo "FAIL: FSDP2 run timed out after ${TIMEOUT}s (a hang: final save?)"
  echo "FAIL: FSDP2 run (exit $rc)"; exit 1; }
"$PY" - "$WORK" "$NPROC" "$STEPS" <<'PY'
import json, sys
from pathlib import Path
work, nproc, steps = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
ok = True
def check(cond, what):
    global ok
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    ok &= bool(cond)
fsdp, ddp = work / "run-fsdp2", work / "run-ddp"
if nproc > 1:
    launch = [json.loads((fsdp / "ranks" / f"launch-{i}.json").read_text()) for i in range(nproc)]
    check(all(l.get("fsdp") and l.get("trainer_distributed_type") == "FSDP" for l in launch),
          f"the Trainer ran FSDP on every rank: {[l.get('trainer_distributed_type') for l in launch]}")
    ranks = [json.loads((fsdp / "ranks" / f"rank-{i}.json").read_text()) for i in range(nproc)]
    check(all(r["steps"] == steps and r["tokens"] > 0 for r in ranks), f"every rank trained {steps} steps")
cps = sorted(p.name for p in (fsdp / "checkpoints").iterdir())
check(cps == [f"checkpoint-{steps // 2}", f"checkpoint-{steps}"], f"one checkpoint set: {cps}")
check((fsdp / "final" / "adapter_model.safetensors").exists(), "one final adapter")
def losses(run):
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return [r["loss"] for r in rows if "loss" in r and "train_loss" not in r]
lf, ld = losses(fsdp), losses(ddp)
diff = max(abs(a - b) for a, b in zip(lf, ld)) if lf and len(lf) == len(ld) else float("inf")
check(diff < 1e-3, f"FSDP2 losses follow DDP's: max |difference| {diff:.2e} over {len(lf)} steps")
try:
    from tunesmith.core.models import load_trained
    model, tok, info = load_trained(str(fsdp))
    check(info.get("steps") == steps, "the final adapter loads onto the base (load_trained)")
except Exception as exc:  # noqa: BLE001
    check(False, f"the final adapter loads: {type(exc).__name__}: {exc}")
print("fsdp2 lora: ok" if ok else "fsdp2 lora: FAILED")
sys.exit(0 if ok else 1)
PY
