#!/usr/bin/env bash
# The converged phone recipe's frontier so far: the .pte points of the runs chosen on validation, one
# file per run in docs/ml1m_recipe/ (written by scripts/ml1m_phone_recipe.sh's queues), gathered into
# docs/ml1m_recipe/frontier/pareto.{csv,md,png} (memcom-pareto --report-only: table, frontier, plot).
#   bash scripts/studies/recipe_frontier.sh
# Every training is a point of its own (the table's training column; hollow markers in the plot): plain,
# QAT int4 fine-tuned from the converged float run, distilled, and both.
set -euo pipefail
cd "$(dirname "$0")/../.."
SRC=docs/ml1m_recipe
OUT=$SRC/frontier
PLAIN="history5 qr16 memcom_qr16 hashing16 qr4 memcom_qr4 lowrank4 lowrank15.7 mixed_dim4_lr0.2 mixed_dim13.9"
TOOLS="qat_int4_qr16_finetuned qat_int4_memcom_qr16_finetuned qat_int4_qr4_finetuned qat_int4_memcom_qr4_finetuned
  qat_int4_memcom_qr16 kd_qr16_finetuned kd_memcom_qr16 kd_qat_int4_qr16_finetuned kd_qat_int4_memcom_qr16_finetuned"
CHOSEN="$PLAIN $TOOLS"
mkdir -p "$OUT"
first=1
for name in $CHOSEN; do
  f="$SRC/${name}_pareto.csv"
  [ -f "$f" ] || { echo "recipe_frontier: $f is missing (run its queue, or drop it from CHOSEN)" >&2; exit 1; }
  if [ $first = 1 ]; then head -1 "$f"; first=0; fi
  tail -n +2 "$f"
done > "$OUT/pareto.csv"
.venv/bin/memcom-pareto --results "$OUT/pareto.csv" --data-dir "${DATA:-data/ml-1m}" --out-dir "$OUT" --report-only \
    > /dev/null
echo "recipe_frontier: $(($(wc -l < "$OUT/pareto.csv") - 1)) points -> $OUT/pareto.{csv,md,png}"
