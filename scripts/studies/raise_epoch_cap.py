"""Re-opens the runs of a ``memcom-experiment`` grid that stopped at their epoch cap, so they resume there.

    .venv/bin/python scripts/studies/raise_epoch_cap.py runs/ml1m_recipe/lr_qr 30 50

A run that ran ``OLD`` epochs (its cap) without early stopping has not shown it converged. This moves
its ``metrics.json`` and its log into its run directory as ``*_capOLD.*`` and drops its cell from the
grid's ``results.csv`` and ``pareto/pareto.csv``; running the same grid again with ``--epochs NEW``
then resumes it from its last checkpoint (the trainer restores the epoch, the validation curve and
early stopping's counter), and ``memcom-pareto`` measures it again.
"""

import csv
import glob
import json
import os
import sys
from typing import List, Tuple

from memcom_torchrec.experiment.grid import parse_run_key


def _rewrite(path: str, keep, change=lambda r: r) -> None:  # pyre-ignore[2]
    """Keeps the rows of the CSV at ``path`` for which ``keep(row)``, each passed through ``change``."""
    if not os.path.exists(path):
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    kept = [change(r) for r in rows if keep(r)]
    with open(path + ".tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(kept)
    os.replace(path + ".tmp", path)


def _with_epochs(args: List[str], epochs: int) -> List[str]:
    if "--epochs" not in args:
        raise ValueError(f"no --epochs in {args}")
    i = args.index("--epochs")
    return args[: i + 1] + [str(epochs)] + args[i + 2:]


def _cell(run_dir: str) -> Tuple[str, float, int]:
    """(method, ratio, seed) of a run directory named by ``memcom-experiment``."""
    method, ratio, seed, _ = parse_run_key(os.path.basename(run_dir))
    return method, ratio, seed


def main(out_dir: str, old_cap: int, new_cap: int) -> List[str]:
    """Re-opens ``out_dir``'s runs that ran ``old_cap`` epochs; returns their run directories.

    Every run's recorded arguments get ``--epochs new_cap``: a run that stopped early under the old cap is
    the same run under the new one. A cell (method, ratio, seed) with a re-opened run is dropped from
    ``results.csv`` (its best learning rate may change) and its runs' points from ``pareto/pareto.csv``.
    """
    reopened, cells = [], set()
    for run_dir in sorted(p for p in glob.glob(os.path.join(out_dir, "runs", "*")) if os.path.isdir(p)):
        args_path = os.path.join(run_dir, "experiment_args.json")
        with open(args_path) as f:
            args = json.load(f)
        with open(args_path, "w") as f:
            json.dump(_with_epochs(args, new_cap), f)
        metrics = os.path.join(run_dir, "metrics.json")
        if not os.path.exists(metrics):
            continue
        with open(metrics) as f:
            m = json.load(f)
        patience = int(m["config"].get("patience", 3))
        early_stopped = m["epochs_run"] - 1 - m["best_epoch"] >= patience
        if m["epochs_run"] != old_cap or early_stopped:  # stopped early, or already under another cap
            continue
        os.replace(metrics, os.path.join(run_dir, f"metrics_cap{old_cap}.json"))
        if os.path.exists(run_dir + ".log"):  # the grid writes a fresh log when the run resumes
            os.replace(run_dir + ".log", os.path.join(run_dir, f"train_cap{old_cap}.log"))
        reopened.append(run_dir)
        cells.add(_cell(run_dir))
    results = os.path.join(out_dir, "results.csv")
    _rewrite(results, lambda r: _cell(r["run_dir"]) not in cells)
    _rewrite(results, lambda r: True, lambda r: dict(r, train_args=" ".join(_with_epochs(r["train_args"].split(),
                                                                                           new_cap))))
    _rewrite(os.path.join(out_dir, "pareto", "pareto.csv"), lambda r: _cell(r["run_dir"]) not in cells)
    return reopened


if __name__ == "__main__":
    for run in main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])):
        print("re-opened", run)
