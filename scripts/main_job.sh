#!/usr/bin/env bash
# The main job on its built-in default, from a fresh clone:
#   set-up -> real MovieLens-100K -> train uncompressed and MEmCom (16x) with 2 local
#   processes each -> full-ranking evaluation and comparison -> phone export of both models (fp32, int8)
#   with the .pte bytes and the nDCG@10 of each .pte itself.
# Finishes in well under 10 minutes on a 2-core machine. Outputs under runs/main/.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/main}
DATA=${DATA:-data/ml-100k}

EXTRAS=${EXTRAS-export} bash scripts/setup.sh
PY=.venv/bin/python

[ -f "$DATA/manifest.json" ] || .venv/bin/memcom-data prepare --dataset ml-100k --out "$DATA"

# Two training runs, each on 2 local processes (gloo on CPU, NCCL on GPUs), then the comparison table.
.venv/bin/memcom-experiment --data-dir "$DATA" --out-dir "$OUT" \
    --methods uncompressed memcom --ratios 16 --nproc 2 --launcher torchx -- --epochs 6 --patience 2

if $PY -c "import executorch" 2>/dev/null; then
  # Every model of the grid exported for phones (fp32 and int8 .pte, parity-checked), and each
  # program's own nDCG@10 on the whole test split through the ExecuTorch runtime, with its bytes.
  .venv/bin/memcom-pareto --results "$OUT/results.csv" --data-dir "$DATA" --out-dir "$OUT/phone" --dtypes fp32 int8
else
  echo "executorch is not installed (EXTRAS=export bash scripts/setup.sh): skipping the phone export"
fi
