"""One table of what each scorer does to each method, from the grids of ``scripts/studies/ml100k_scorers.sh``.

Study script; it produced the table of ``docs/ml100k_scorers.md`` (the scorer study):

    .venv/bin/python scripts/studies/scorer_table.py runs/ml100k_scorers

Rows: methods; columns: model shapes (one ``memcom-experiment`` out-dir each); cells: test
nDCG@10 (relative loss against the same shape's uncompressed model).
"""

import csv
import glob
import os
import sys

SHAPES = ["next_item_linear", "next_item_tied", "ranknet_dot", "ranknet_mlp", "next_item_tied_user"]


def main(root: str) -> None:
    cells, methods = {}, []
    for path in sorted(glob.glob(os.path.join(root, "*", "results.csv"))):
        shape = os.path.basename(os.path.dirname(path))
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                key = f"{row['method']} {float(row['compression_ratio']):g}x"
                cells[key, shape] = float(row["ndcg@k"])
                if key not in methods:
                    methods.append(key)
    shapes = [s for s in SHAPES if any(k[1] == s for k in cells)]
    print("| method | " + " | ".join(shapes) + " |")
    print("|---|" + "---|" * len(shapes))
    base = {s: cells.get(("uncompressed 1x", s)) for s in shapes}
    for m in methods:
        out = []
        for s in shapes:
            v = cells.get((m, s))
            if v is None:
                out.append("-")
            else:
                loss = f" ({(1 - v / base[s]) * 100:+.0f}%)" if base[s] and not m.startswith("uncompressed") else ""
                out.append(f"{v:.4f}{loss}")
        print(f"| {m} | " + " | ".join(out) + " |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/ml100k_scorers")
