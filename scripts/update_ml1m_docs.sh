#!/usr/bin/env bash
# Redraws an ML-1M table and plot from RUN_DIR/results.csv into docs/NAME.{md,png,csv} and into the
# README between its <!-- NAME-table --> markers.
#   bash scripts/update_ml1m_docs.sh [RUN_DIR] [NAME]   (default: runs/ml1m_tuned ml1m_results)
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${1:-runs/ml1m_tuned}
NAME=${2:-ml1m_results}
.venv/bin/memcom-experiment --data-dir data/ml-1m --out-dir "$RUN_DIR" --report-only > /dev/null
mkdir -p docs
cp "$RUN_DIR/results.md" "docs/$NAME.md"
cp "$RUN_DIR/results.png" "docs/$NAME.png"
cp "$RUN_DIR/results.csv" "docs/$NAME.csv"
NAME=$NAME .venv/bin/python - <<'PY'
import os, re
name = os.environ["NAME"]
table = open(f"docs/{name}.md").read().split("\n", 2)[2].strip()  # drop the first paragraph
readme = open("README.md").read()
readme = re.sub(rf"<!-- {name}-table -->.*<!-- /{name}-table -->",
                lambda _: f"<!-- {name}-table -->\n" + table + f"\n<!-- /{name}-table -->", readme, flags=re.S)
open("README.md", "w").write(readme)
PY
