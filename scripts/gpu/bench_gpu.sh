#!/usr/bin/env bash
# The GPU check of issue 19, one command: bf16 + the compiled step + Liger kernels
# beside TRL's SFTTrainer and a plain Trainer on the same batches; tokens/s and
# peak GPU memory (bench/results/bench_train.json; the table is printed).
#
#   bash scripts/gpu/bench_gpu.sh            # on a machine with a CUDA GPU and .venv installed
#   STEPS=30 REPEAT=3 bash scripts/gpu/bench_gpu.sh
#
# Needs: a CUDA build of torch in .venv (TORCH_SPEC at make install), the default
# model in the user cache (it loads offline), and for the -liger variants
# `pip install 'tunesmith[liger]'` beforehand (they are skipped when it is missing).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
STEPS=${STEPS:-20}
REPEAT=${REPEAT:-2}
BATCH=${BATCH:-8}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TUNESMITH_NO_PROGRESS=1
"$PY" - <<'PY'
import torch, sys
if not torch.cuda.is_available():
    sys.exit("no CUDA GPU visible: this is the GPU benchmark")
print("GPU:", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability(), "torch", torch.__version__)
from tunesmith.core.precision import choose_precision
print(choose_precision("auto").line())
PY
VARIANTS=(transformers trl tunesmith tunesmith-auto tunesmith-auto-compiled)
if "$PY" -c "import liger_kernel" 2>/dev/null; then
  VARIANTS+=(trl-liger tunesmith-auto-liger)
else
  echo "liger-kernel not installed: the -liger variants are skipped (pip install 'tunesmith[liger]')"
fi
# --precision bf16: the plain baselines and the 'tunesmith' variant in bf16 autocast, like tunesmith-auto on Ampere+
"$PY" bench/bench_train.py --precision bf16 --steps "$STEPS" --batch "$BATCH" --repeat "$REPEAT" --no-peak \
  --only "${VARIANTS[@]}"
