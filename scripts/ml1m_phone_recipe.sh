#!/usr/bin/env bash
# ML-1M phone recipe search (tied scorer, no user id, batch 1,024, dropout 0.25, patience 3, up to
# EPOCHS = 50 epochs; the first searches used 30), every choice made on validation, the same candidate
# set for every method. Each queue exports and evaluates its runs in the same job (memcom-pareto),
# since runs/ does not travel.
#   STEP=history bash scripts/ml1m_phone_recipe.sh   # uncompressed, history 5 vs 10 (one core)
#   STEP=lr METHOD=memcom_qr bash scripts/ml1m_phone_recipe.sh  # embedding lr in {0.05, 0.1, 0.2} at 16x
#   (one method per job, one core each: run two methods side by side on 2 cores; uncompressed: RATIOS=1)
#   STEP=extend DIR=runs/ml1m_recipe/lr_qr [OLD_CAP=30] bash scripts/ml1m_phone_recipe.sh  # resume DIR's runs that
#   stopped at the 30-epoch cap, up to EPOCHS, then measure them again (scripts/studies/raise_epoch_cap.py)
#   STEP=grid METHOD=qr RATIOS="4 8" LRS=0.2 bash scripts/ml1m_phone_recipe.sh  # the Pareto's other
#   ratios at the learning rate chosen at 16x
#   STEP=distill METHOD=memcom_qr LRS=0.1 bash scripts/ml1m_phone_recipe.sh  # distilled from the h5 teacher
#   (TEACHER: the uncompressed history-5 run of STEP=history; ALPHA 0.5, TEMPERATURE 2 by default)
#   STEP=qat METHOD=memcom_qr LRS=0.1 bash scripts/ml1m_phone_recipe.sh  # quantisation-aware, QAT=int4
#   STEP=qat INIT=runs/ml1m_recipe/lr_a/runs/memcom_qr_r16_s0_lr0.1 METHOD=memcom_qr LRS=0.1 bash ...
#   (the same, fine-tuning the converged float run INIT instead of training from scratch)
#   STEP=distill and STEP=qat take RATIOS (one ratio, 16 by default; another ratio adds _r<ratio> to the
#   out-dir) and INIT; STEP=distill QAT=int4 distils and trains for int4 at once (kd_qat_int4_<method>...)
#   STEP=qat QAT=int4_row ... trains for row-wise int4 (one scale per row) and exports at it as well;
#   DTYPES="fp32 int8 int4 int4_row" (any step) chooses the exports
#   HIDDEN="64" (any step) narrows the MLP (default one layer of 256): at 1/16 of the bytes its int4 weights
#   are a third of the program; use another OUT, e.g. OUT=runs/ml1m_recipe/hidden64, and the same HIDDEN for
#   a STEP=qat INIT= fine-tune of such a run
#   SEEDS="1" (any step; 0 by default) trains other seeds; give each seed its own OUT (results.csv is per
#   out-dir), e.g. the headline point's seeds 1 and 2 side by side, one core each:
#   SEEDS=1 OUT=runs/ml1m_recipe/seed1 HIDDEN=64 STEP=grid METHOD=memcom_qr RATIOS=4 LRS=0.1 bash ...
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/ml1m_recipe}
DATA=${DATA:-data/ml-1m}
HISTORY=${HISTORY:-5}
LRS=${LRS:-0.05 0.1 0.2}
EPOCHS=${EPOCHS:-50}
RATIOS=${RATIOS:-16}
SEEDS=${SEEDS:-0}
DTYPES=${DTYPES:-fp32 int8 int4}  # every run's exports; a QAT run's own grid is added where missing
qat_dtype=${QAT:-$([ "${STEP:-history}" = qat ] && echo int4 || true)}
[ -z "$qat_dtype" ] || [[ " $DTYPES " == *" $qat_dtype "* ]] || DTYPES="$DTYPES $qat_dtype"
[ -f "$DATA/manifest.json" ] || .venv/bin/memcom-data prepare --dataset ml-1m --out "$DATA"
TEACHER=${TEACHER:-$OUT/h5/runs/uncompressed_r1_s0_lr0.2}
SUFFIX=$([ "$RATIOS" = 16 ] || echo "_r$RATIOS")${INIT:+_finetuned}  # distill and qat out-dirs
grid() {  # out_dir methods ratios lrs history [extra trainer flags]
  OMP_NUM_THREADS=1 .venv/bin/memcom-experiment --data-dir "$DATA" --out-dir "$1" --methods $2 \
      --ratios $3 --embedding-lrs $4 --seeds $SEEDS --launcher python -- \
      --model next_item --scorer tied --use-user-id false --history-len "$5" --batch-size 1024 \
      --epochs "$EPOCHS" --patience 3 --dropout 0.25 ${HIDDEN:+--hidden $HIDDEN} "${@:6}"
  OMP_NUM_THREADS=1 .venv/bin/memcom-pareto --results "$1/results.csv" --data-dir "$DATA" \
      --out-dir "$1/pareto" --repeats 20 --dtypes $DTYPES
}
case "${STEP:-history}" in
  history) for h in 5 10; do grid "$OUT/h$h" uncompressed 1 0.2 "$h"; done ;;
  lr) grid "$OUT/lr_${METHOD:?set METHOD, e.g. METHOD=qr}" "$METHOD" "$RATIOS" "$LRS" "$HISTORY" ;;
  grid) grid "$OUT/grid_${METHOD:?set METHOD}" "$METHOD" "$RATIOS" "${LRS:?the lr chosen at 16x}" "$HISTORY" ;;
  extend)  # the grid's own methods, ratios and lrs, read back from its results and re-opened runs
    .venv/bin/python scripts/studies/raise_epoch_cap.py "${DIR:?set DIR}" "${OLD_CAP:-30}" "$EPOCHS"
    cells=$(.venv/bin/python - "$DIR" <<'PY'
import glob, os, sys
from memcom_torchrec.experiment.grid import parse_run_key
keys = [parse_run_key(os.path.basename(p)) for p in glob.glob(os.path.join(sys.argv[1], "runs", "*")) if os.path.isdir(p)]
print(" ".join(sorted({k[0] for k in keys})), "|", " ".join(sorted({f"{k[1]:g}" for k in keys})), "|",
      " ".join(sorted({f"{k[3]:g}" for k in keys})))
PY
)
    IFS='|' read -r methods ratios lrs <<< "$cells"
    grid "$DIR" "$methods" "$ratios" "$lrs" "$HISTORY" ;;
  distill) grid "$OUT/kd${QAT:+_qat_$QAT}_${METHOD:?set METHOD}$SUFFIX" "$METHOD" "$RATIOS" "$LRS" "$HISTORY" \
      --teacher "$TEACHER" --distill-alpha "${ALPHA:-0.5}" --distill-temperature "${TEMPERATURE:-2}" \
      ${QAT:+--qat "$QAT"} ${INIT:+--init-from "$INIT"} ;;
  qat) grid "$OUT/qat_${QAT:-int4}_${METHOD:?set METHOD}$SUFFIX" "$METHOD" "$RATIOS" "$LRS" "$HISTORY" \
      --qat "${QAT:-int4}" ${INIT:+--init-from "$INIT"} ;;
esac
