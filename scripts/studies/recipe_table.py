"""One Markdown row per grid of the phone recipe: how it trained and what its ``.pte`` programs score.

    .venv/bin/python scripts/studies/recipe_table.py qr16 memcom_qr16 qat_int4_qr16_finetuned ...

For each NAME, reads ``docs/ml1m_recipe/NAME_results.csv`` (``memcom-experiment``: the run chosen on
validation) and ``NAME_pareto.csv`` (``memcom-pareto``: its programs through the ExecuTorch runtime on
every test user), so the tables in ``docs/RESULTS.md`` are printed from the committed files, not typed.
Columns: method and ratio as stored, MLP widths and training (``memcom-pareto``'s labels), embedding lr,
epochs run and the best one (counted from 1), valid nDCG@10 (on the int4 grid for a QAT run), then
each program's test nDCG@10 and KB at fp32 / int8 / int4.
"""

import os
import sys
from typing import List

from memcom_torchrec.experiment.grid import read_results
from memcom_torchrec.experiment.pareto import read_points

SRC = "docs/ml1m_recipe"
DTYPES = ("fp32", "int8", "int4")


def table_row(name: str) -> str:
    """The Markdown row of grid ``name`` (one run: the recipe's grids choose one lr per cell)."""
    run, = read_results(os.path.join(SRC, f"{name}_results.csv"))
    points = {p["dtype"]: p for p in read_points(os.path.join(SRC, f"{name}_pareto.csv"))
              if p["run_dir"] == run["run_dir"]}
    missing = [d for d in DTYPES if d not in points]
    if missing:
        raise SystemExit(f"recipe_table: {name}_pareto.csv has no {missing} point of {run['run_dir']}")
    ndcg = " / ".join(f"{float(points[d]['ndcg@k']):.4f}" for d in DTYPES)
    kb = " / ".join(f"{int(points[d]['pte_bytes']) / 1e3:.0f}" for d in DTYPES)
    return (f"| {run['method']} ({float(run['item_table_ratio'] or run['compression_ratio']):.2f}x) | "
            f"{points['fp32'].get('mlp') or '-'} | {points['fp32'].get('training') or '-'} | {float(run['embedding_lr']):g} | "
            f"{run['epochs_run']} ({int(run['best_epoch']) + 1}) | {float(run['valid_ndcg@k']):.4f} | {ndcg} | {kb} |")


def main(names: List[str]) -> None:
    print("| method (ratio as stored) | MLP | training | lr | epochs run (best) | valid nDCG@10 "
          "| `.pte` nDCG@10 fp32 / int8 / int4 | KB fp32 / int8 / int4 |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        print(table_row(name))


if __name__ == "__main__":
    main(sys.argv[1:])
