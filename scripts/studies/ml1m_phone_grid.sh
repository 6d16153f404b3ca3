#!/usr/bin/env bash
# Study script: ML-1M grid of phone-shaped next-item models: no user id, `tied` scorer (logits from the
# input item table), every method at several ratios, each method's learning rate from the 16x
# replica search (docs/RESULTS.md "ML-1M: where MEmCom stands", step 1), dropout 0.25, <= 12 epochs, patience 2.
# Two queues run side by side (2 cores); results append to $OUT/results.csv as each run ends.
# Produced docs/ml1m_phone_results.{md,csv} (runs/ml1m_phone), docs/ml1m_phone_user_results.csv
# (runs/ml1m_phone_user) and, through memcom-pareto, docs/ml1m_pareto.{md,csv,png}.
#   bash scripts/studies/ml1m_phone_grid.sh            # the grid (queues a, b and user)
#   QUEUE=a bash scripts/studies/ml1m_phone_grid.sh    # one queue only (a, b, user, c)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/ml1m_phone}
DATA=${DATA:-data/ml-1m}
[ -f "$DATA/manifest.json" ] || .venv/bin/memcom-data prepare --dataset ml-1m --out "$DATA"
cell() {  # method ratio lr seed [extra trainer flags]
  local m=$1 r=$2 lr=$3 s=$4; shift 4
  OMP_NUM_THREADS=1 .venv/bin/memcom-experiment --data-dir "$DATA" --out-dir "${CELL_OUT:-$OUT}" --methods "$m" \
      --ratios "$r" --embedding-lrs "$lr" --seeds "$s" --launcher python -- \
      --model next_item --scorer tied --use-user-id "${USER_ID:-false}" --epochs 12 --patience 2 --dropout 0.25 "$@"
}
# The tied scorer costs the shared-table methods far more than the linear one (MEmCom 4x -32%, QR 4x
# -20%, against -6% with the linear scorer and a user id), so the grid favours the methods that are
# not collinear (memcom_qr, qr) over MEmCom at 32x and the hashing trick at several ratios;
# queue_user measures the user id's worth (uncompressed, tied, with a user table). queue_c
# (memcom_qr 4x, the hashing trick at 4x) is not part of the default run and has no committed result.
queue_a() {
  cell uncompressed 1 0.2 0; cell memcom 8 0.1 0; cell qr 8 0.05 0; cell memcom_qr 16 0.1 0
  cell memcom_qr 8 0.1 0
}
queue_b() {
  cell memcom 4 0.2 0; cell qr 4 0.05 0; cell memcom 16 0.1 0; cell qr 16 0.05 0; cell hashing 16 0.1 0
}
queue_user() { CELL_OUT=${OUT}_user USER_ID=true cell uncompressed 1 0.2 0; }
queue_c() { cell memcom_qr 4 0.1 0; cell hashing 4 0.1 0; }
case "${QUEUE:-all}" in
  a) queue_a ;;
  b) queue_b ;;
  user) queue_user ;;
  c) queue_c ;;
  *) queue_a & queue_b & queue_user & wait ;;
esac
