#!/usr/bin/env bash
# Study script: the ML-1M server-table cells of lowrank and mixed_dim (issue 25), under the protocol of
# docs/RESULTS.md's "ML-1M: where MEmCom stands" (next-item classifier, linear scorer, user id, dropout 0.25,
# <= 12 epochs, patience 2), at each method's largest ratio (16x is beyond both), the embedding lr chosen on
# validation from {0.05, 0.1, 0.2}. Each method's grid has its own out-dir (a grid's cells keep the lrs they
# were run with); the chosen rows are then appended to $OUT/results.csv and the docs redrawn.
#   bash scripts/studies/ml1m_lowrank_mixed_dim.sh      # two queues side by side (2 cores), then the docs
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/ml1m_tuned}
DATA=${DATA:-data/ml-1m}
[ -f "$DATA/manifest.json" ] || .venv/bin/memcom-data prepare --dataset ml-1m --out "$DATA"
search() {  # method ratio
  OMP_NUM_THREADS=1 .venv/bin/memcom-experiment --data-dir "$DATA" --out-dir "${OUT}_lr/$1" --methods "$1" \
      --ratios "$2" --embedding-lrs 0.1 0.05 0.2 --seeds 0 --launcher python -- --epochs 12 --patience 2 --dropout 0.25
}
search lowrank 15.7 & search mixed_dim 13.9 & wait
# mixed_dim's lr-0.05 run peaked at the 12-epoch cap: re-opened and resumed under a cap of 30 (it stopped at 14,
# the 12th epoch still its best); the early-stopped runs are reused as they are
.venv/bin/python scripts/studies/raise_epoch_cap.py "${OUT}_lr/mixed_dim" 12 30
OMP_NUM_THREADS=1 .venv/bin/memcom-experiment --data-dir "$DATA" --out-dir "${OUT}_lr/mixed_dim" --methods mixed_dim \
    --ratios 13.9 --embedding-lrs 0.1 0.05 0.2 --seeds 0 --launcher python -- --epochs 30 --patience 2 --dropout 0.25
.venv/bin/python - "$OUT" <<'PY'
import sys
from memcom_torchrec.experiment.grid import read_results, rewrite_csv
out = sys.argv[1]
rows = [r for r in read_results(f"{out}/results.csv") if r["method"] not in ("lowrank", "mixed_dim")]
for m in ("lowrank", "mixed_dim"):
    rows += read_results(f"{out}_lr/{m}/results.csv")
rewrite_csv(f"{out}/results.csv", rows)
PY
bash scripts/update_result_docs.sh "$OUT" ml1m_results "$DATA"
