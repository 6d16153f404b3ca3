#!/usr/bin/env bash
# Study script: what each scorer does to each method, on ML-100K: phone-shaped models (no user id)
# with every scorer, each method at 16x (uncompressed at 1x; the hashing trick left out: MEmCom
# extends it), one seed, the ML-1M learning rates, dropout 0.25, <= 8 epochs, patience 2, RankNet
# with 16 sampled negatives; plus the user id's worth for the tied classifier.
# Produced docs/ml100k_scorers_<shape>.csv (each shape's results.csv) and, through
# scripts/studies/scorer_table.py, the table of docs/ml100k_scorers.md.
#   bash scripts/studies/ml100k_scorers.sh   # -> runs/ml100k_scorers/<shape>/results.csv
#   .venv/bin/python scripts/studies/scorer_table.py runs/ml100k_scorers   # the table
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/ml100k_scorers}
DATA=${DATA:-data/ml-100k}
[ -f "$DATA/manifest.json" ] || .venv/bin/memcom-data prepare --dataset ml-100k --out "$DATA"
shape() {  # name model scorer use_user_id [cells...]
  local name=$1 model=$2 scorer=$3 user=$4; shift 4
  local cells=("$@")
  [ ${#cells[@]} -gt 0 ] || cells=("uncompressed 1 0.2" "qr 16 0.05" "memcom 16 0.1" "memcom_qr 16 0.1")
  for cell in "${cells[@]}"; do
    set -- $cell
    OMP_NUM_THREADS=1 .venv/bin/memcom-experiment --data-dir "$DATA" --out-dir "$OUT/$name" --methods "$1" \
        --ratios "$2" --embedding-lrs "$3" --seeds 0 --launcher python -- \
        --model "$model" --scorer "$scorer" --use-user-id "$user" --epochs 8 --patience 2 --dropout 0.25 \
        --num-negatives 16
  done
}
shape next_item_linear next_item linear false
shape next_item_tied next_item tied false
shape ranknet_dot ranknet dot false
shape ranknet_mlp ranknet mlp false
shape next_item_tied_user next_item tied true "uncompressed 1 0.2" "memcom 16 0.1"
