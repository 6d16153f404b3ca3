#!/usr/bin/env bash
# Redraws the ML-1M table and plot from runs/ml1m/results.csv into docs/ (what the README shows).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/memcom-experiment --data-dir data/ml-1m --out-dir runs/ml1m --report-only > /dev/null
mkdir -p docs
cp runs/ml1m/results.md docs/ml1m_results.md
cp runs/ml1m/results.png docs/ml1m_results.png
cp runs/ml1m/results.csv docs/ml1m_results.csv
# ...and into the README, between its ml1m-table markers
.venv/bin/python - <<'PY'
import re
table = open("docs/ml1m_results.md").read().split("\n", 2)[2].strip()  # drop the first paragraph
readme = open("README.md").read()
readme = re.sub(r"<!-- ml1m-table -->.*<!-- /ml1m-table -->",
                lambda _: "<!-- ml1m-table -->\n" + table + "\n<!-- /ml1m-table -->", readme, flags=re.S)
open("README.md", "w").write(readme)
PY
