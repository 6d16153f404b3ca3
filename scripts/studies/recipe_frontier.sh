#!/usr/bin/env bash
# The ML-1M phone Pareto: the .pte points of every run of the converged phone recipe chosen on validation,
# one file per run in docs/ml1m_recipe/ (written by scripts/ml1m_phone_recipe.sh's queues), gathered into
# docs/ml1m_pareto.{csv,md,png} (memcom-pareto --report-only: table, frontier, plot), after checking that
# no run peaked at its epoch cap (best epoch = last epoch run, from each run's NAME_results.csv), those
# of OTHERS (other seeds, the distillation search) included.
#   bash scripts/studies/recipe_frontier.sh
# Every training is a point of its own (the table's training column; hollow markers in the plot, named
# where on the frontier): plain, QAT int4 fine-tuned from the converged float run, distilled, and both.
set -euo pipefail
cd "$(dirname "$0")/../.."
SRC=docs/ml1m_recipe
OUT=${OUT:-docs}
PLAIN="history5 hashing16 memcom16 memcom_2hash16 qr16 memcom_qr16 hashing4 memcom4 memcom_2hash4 qr4 memcom_qr4
  qr8 memcom_qr8 lowrank4 lowrank15.7 mixed_dim4_lr0.2 mixed_dim13.9 history5_mlp64 memcom_qr4_mlp64 memcom_qr8_mlp64"
TOOLS="qat_int4_qr16_finetuned qat_int4_memcom_qr16_finetuned qat_int4_qr4_finetuned qat_int4_memcom_qr4_finetuned
  qat_int4_memcom_qr16 kd_qr16_finetuned kd_memcom_qr16 kd_qat_int4_qr16_finetuned kd_qat_int4_memcom_qr16_finetuned
  qat_int4_memcom_qr8_mlp64_finetuned qat_int4_row_memcom_qr4_mlp64_finetuned kd_search_a0.1_T1"
CHOSEN=${CHOSEN:-$PLAIN $TOOLS}
# checked for the cap but not points of the Pareto (one seed per cell there, and one (a, T)): the headline
# point's other seeds (_s2_rerun: seed 2 trained again on another machine, see docs/RESULTS.md) and the
# distillation search's other settings
OTHERS=${OTHERS-history5_s1 history5_s2 memcom_qr4_mlp64_s1 memcom_qr4_mlp64_s2
  qat_int4_row_memcom_qr4_mlp64_finetuned_s1 qat_int4_row_memcom_qr4_mlp64_finetuned_s2
  kd_search_a0.1_T4 kd_search_a0.5_T2 kd_search_a0.1_T1_s1 memcom_qr4_mlp64_s2_rerun
  qat_int4_row_memcom_qr4_mlp64_finetuned_s2_rerun kd_search_a0.1_T1_s2_rerun kd_search_a0.3_T1_s2_rerun}
for name in $CHOSEN $OTHERS; do
  for kind in results pareto; do
    [ -f "$SRC/${name}_$kind.csv" ] || { echo "recipe_frontier: $SRC/${name}_$kind.csv is missing (run its queue," \
        "or leave it out: CHOSEN=\"...\")" >&2; exit 1; }
  done
done
# best_epoch counts from 0: a run whose best epoch is its last one stopped at its cap while still improving
.venv/bin/python - $(for n in $CHOSEN $OTHERS; do echo "$SRC/${n}_results.csv"; done) <<'PY'
import csv, sys
peaked = [f"{r['method']} {r['compression_ratio']}x ({path})" for path in sys.argv[1:] for r in csv.DictReader(open(path))
          if int(r["best_epoch"]) == int(r["epochs_run"]) - 1]
if peaked:
    sys.exit("recipe_frontier: peaked at the epoch cap, not converged: " + "; ".join(peaked))
print(f"recipe_frontier: {len(sys.argv) - 1} grids, every run stopped early (none peaked at its epoch cap)")
PY
first=1
for name in $CHOSEN; do
  f="$SRC/${name}_pareto.csv"
  if [ $first = 1 ]; then head -1 "$f"; first=0; fi
  tail -n +2 "$f"
done > "$OUT/ml1m_pareto.csv"
tmp=$(mktemp -d)
cp "$OUT/ml1m_pareto.csv" "$tmp/pareto.csv"
.venv/bin/memcom-pareto --results "$tmp/pareto.csv" --data-dir "${DATA:-data/ml-1m}" --out-dir "$tmp" --report-only \
    > /dev/null
cp "$tmp/pareto.md" "$OUT/ml1m_pareto.md"
cp "$tmp/pareto.png" "$OUT/ml1m_pareto.png"
rm -r "$tmp"
echo "recipe_frontier: $(($(wc -l < "$OUT/ml1m_pareto.csv") - 1)) points -> $OUT/ml1m_pareto.{csv,md,png}"
