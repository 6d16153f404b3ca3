#!/usr/bin/env bash
# The main job on its built-in default, from a fresh clone:
#   set-up -> real MovieLens-100K -> train uncompressed and MEmCom (16x) with 2 local
#   processes each -> full-ranking evaluation and comparison -> phone export of the MEmCom model.
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

RUN=$($PY -c "import csv,sys; print(next(r['run_dir'] for r in csv.DictReader(open(sys.argv[1])) if r['method'] == 'memcom'))" "$OUT/results.csv")
if $PY -c "import executorch" 2>/dev/null; then
  .venv/bin/memcom-export --checkpoint "$RUN" --out "$OUT/memcom16.pte" --dtype compact
else
  echo "executorch is not installed (EXTRAS=export bash scripts/setup.sh): skipping the phone export"
fi
