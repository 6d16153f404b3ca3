#!/usr/bin/env bash
# Study script: ML-1M grid of the MEmCom-family variants under the protocol of docs/RESULTS.md's
# "ML-1M: where MEmCom stands" (next-item classifier, linear scorer, user id, dropout 0.25,
# <= 12 epochs, patience 2), with MEmCom's own 16x choice of learning rate (0.1): the variants get
# no learning-rate search of their own (see docs/RESULTS.md). Results append to $OUT/results.csv as
# each run ends, next to the committed cells of the other methods.
# Produced the variant rows of docs/ml1m_results.{md,png,csv} (through scripts/update_result_docs.sh).
#   bash scripts/studies/ml1m_variants.sh            # queues a and b side by side (2 cores), then c
#   QUEUE=a bash scripts/studies/ml1m_variants.sh    # one queue only (a, b, c)
# The --cluster-vectors output probe (stopped after 2 epochs, see docs/RESULTS.md) is
#   memcom-experiment ... --methods memcom_clustered --ratios 16 ... -- <the flags below> --cluster-vectors output
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/ml1m_tuned}
DATA=${DATA:-data/ml-1m}
[ -f "$DATA/manifest.json" ] || .venv/bin/memcom-data prepare --dataset ml-1m --out "$DATA"
cell() {  # method ratio lr seed
  OMP_NUM_THREADS=1 .venv/bin/memcom-experiment --data-dir "$DATA" --out-dir "$OUT" --methods "$1" \
      --ratios "$2" --embedding-lrs "$3" --seeds "$4" --launcher python -- --epochs 12 --patience 2 --dropout 0.25
}
# The committed cells, in queue order. Each clustered cell trains its memcom_2hash warm-up first, in
# <run>/warmup; the committed clustered cells share memcom_clustered's warm-up, copied into the
# other clustered run dirs, which resume from it.
queue_a() { cell memcom_clustered 16 0.1 0; cell memcom_freq 16 0.1 0; cell memcom_2hash 16 0.1 2; }
queue_b() { cell memcom_2hash 16 0.1 0; cell memcom_2hash 8 0.1 0; cell memcom_2hash 16 0.1 1; }
queue_c() { cell memcom_clustered_2hash 16 0.1 0; }
case "${QUEUE:-all}" in
  a) queue_a ;;
  b) queue_b ;;
  c) queue_c ;;
  *) queue_a & queue_b & wait; queue_c ;;
esac
