#!/usr/bin/env bash
# Redraws a results table and plot from RUN_DIR/results.csv (popularity from DATA_DIR) into
# docs/NAME.{md,png,csv} and into docs/RESULTS.md between its <!-- NAME-table --> markers.
#   bash scripts/update_result_docs.sh [RUN_DIR] [NAME] [DATA_DIR]
#   (default: runs/ml1m_tuned ml1m_results data/ml-1m)
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${1:-runs/ml1m_tuned}
NAME=${2:-ml1m_results}
DATA_DIR=${3:-data/ml-1m}
.venv/bin/memcom-experiment --data-dir "$DATA_DIR" --out-dir "$RUN_DIR" --report-only > /dev/null
mkdir -p docs
cp "$RUN_DIR/results.md" "docs/$NAME.md"
cp "$RUN_DIR/results.png" "docs/$NAME.png"
cp "$RUN_DIR/results.csv" "docs/$NAME.csv"
NAME=$NAME .venv/bin/python - <<'PY'
import os, re
name = os.environ["NAME"]
table = open(f"docs/{name}.md").read().split("\n", 2)[2].strip()  # drop the first paragraph
results = open("docs/RESULTS.md").read()
if f"<!-- {name}-table -->" not in results:
    raise SystemExit(f"update_result_docs: docs/RESULTS.md has no <!-- {name}-table --> markers; add them where the table goes")
results = re.sub(rf"<!-- {name}-table -->.*<!-- /{name}-table -->",
                 lambda _: f"<!-- {name}-table -->\n" + table + f"\n<!-- /{name}-table -->", results, flags=re.S)
open("docs/RESULTS.md", "w").write(results)
PY
