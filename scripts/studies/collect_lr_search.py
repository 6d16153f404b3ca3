"""One row per run of the phone recipe's learning-rate search -> ``docs/ml1m_recipe/lr_search.csv``.

    .venv/bin/python scripts/studies/collect_lr_search.py docs/ml1m_recipe/lr_search.csv [RUNS_GLOB]

Reads every ``runs/ml1m_recipe/lr_*/runs/<run>.log`` (``scripts/ml1m_phone_recipe.sh STEP=lr``):
the validation curve from the log (a resumed run's log holds only the epochs since it resumed), and
for a finished run its ``metrics.json`` (the whole curve, best epoch, test nDCG@10). A run still training is listed as unfinished; an unfinished run is dropped where
a finished run of the same method and learning rate exists (an earlier, interrupted attempt).
"""

import csv
import glob
import json
import os
import re
import sys

EPOCH_CAP = 30


def row_of(log: str) -> dict:
    run = log[:-4]
    method, ratio, seed, lr = re.match(r"(.+)_r([\d.]+)_s(\d+)_lr([\d.]+)$", os.path.basename(run)).groups()
    with open(log, errors="replace") as f:
        scores = [(int(e), float(v)) for e, v in re.findall(r"epoch (\d+): train loss \S+, valid nDCG@10 ([0-9.]+)",
                                                             f.read())]
    valid = [v for _, v in scores]
    row = dict(method=method, compression_ratio=float(ratio), embedding_lr=float(lr), seed=int(seed), history_len=5,
               epoch_cap="",
               epochs_run=scores[-1][0] + 1 if scores else 0,
               best_epoch=max(scores, key=lambda s: s[1])[0] if scores else "",
               valid_ndcg=max(valid) if valid else "", test_ndcg="", status="unfinished when collected",
               valid_curve=" ".join(f"{v:.4f}" for v in valid))
    metrics = os.path.join(run, "metrics.json")
    if os.path.exists(metrics):
        with open(metrics) as f:
            m = json.load(f)
        cap = int(m["config"].get("epochs", EPOCH_CAP))  # the run's own cap (30 for the first searches, then 50)
        capped = m["epochs_run"] >= cap
        curve = [e["ndcg"] for e in m["valid_curve"]]  # the whole curve (a resumed run's log starts mid-way)
        row.update(test_ndcg=round(m["test_ndcg"], 6), valid_ndcg=round(m["valid_ndcg"], 6),
                   valid_curve=" ".join(f"{v:.4f}" for v in curve),
                   best_epoch=m["best_epoch"], epochs_run=m["epochs_run"], epoch_cap=cap,
                   status=f"epoch cap {cap}, best epoch {m['best_epoch'] + 1}, no gain in its last "
                          f"{cap - 1 - m['best_epoch']}" if capped else "early stopping (patience 3)")
    return row


def main() -> None:
    rows = [row_of(log) for log in sorted(glob.glob(sys.argv[2] if len(sys.argv) > 2 else
                                                    "runs/ml1m_recipe/lr_*/runs/*.log"))]
    finished = {(r["method"], r["embedding_lr"]) for r in rows if r["test_ndcg"] != ""}
    rows = [r for r in rows if r["test_ndcg"] != "" or (r["method"], r["embedding_lr"]) not in finished]
    # an interrupted earlier attempt and its rerun, both unfinished: keep the longer curve
    best = {}
    for r in rows:
        key = (r["method"], r["embedding_lr"])
        if key not in best or (r["test_ndcg"] != "", r["epochs_run"]) > (best[key]["test_ndcg"] != "",
                                                                          best[key]["epochs_run"]):
            best[key] = r
    rows = sorted(best.values(), key=lambda r: (r["method"], r["embedding_lr"]))
    with open(sys.argv[1], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    for r in rows:
        print(r["method"], r["embedding_lr"], r["epochs_run"], r["best_epoch"], r["valid_ndcg"], r["test_ndcg"],
              r["status"])


if __name__ == "__main__":
    main()
