"""One Markdown row per grid of the phone recipe: how it trained and what its ``.pte`` programs score.

    .venv/bin/python scripts/studies/recipe_table.py qr16 memcom_qr16 qat_int4_qr16_finetuned ...
    .venv/bin/python scripts/studies/recipe_table.py --dtypes fp32,int4_row --mean NAME_s0 NAME_s1 NAME_s2

For each NAME, reads ``docs/ml1m_recipe/NAME_results.csv`` (``memcom-experiment``: the run chosen on
validation) and ``NAME_pareto.csv`` (``memcom-pareto``: its programs through the ExecuTorch runtime on
every test user), so the tables in ``docs/RESULTS.md`` are printed from the committed files, not typed.
Columns: method and ratio as stored, MLP widths and training (``memcom-pareto``'s labels; a and T of a
distilled run), seed, embedding
lr, epochs run and the best one (counted from 1), valid nDCG@10 (on the int4 grid for a QAT run), then
each program's test nDCG@10 and KB at ``--dtypes`` (fp32 / int8 / int4 by default). ``--mean`` adds a
row with the mean and sample standard deviation of the rows above (e.g. one setting's seeds).
"""

import argparse
import os
import shlex
import statistics
from typing import Dict, List, Sequence, Tuple

from memcom_torchrec.experiment.grid import read_results
from memcom_torchrec.experiment.pareto import read_points
from memcom_torchrec.train.cli import parse_config

SRC = "docs/ml1m_recipe"
DTYPES = ("fp32", "int8", "int4")


def read_grid(name: str, dtypes: Sequence[str]) -> Tuple[Dict[str, str], Dict[str, Dict[str, str]]]:
    """The run of grid ``name`` (one: the recipe's grids choose one lr per cell) and its programs by dtype."""
    run, = read_results(os.path.join(SRC, f"{name}_results.csv"))
    points = {p["dtype"]: p for p in read_points(os.path.join(SRC, f"{name}_pareto.csv"))
              if p["run_dir"] == run["run_dir"]}
    missing = [d for d in dtypes if d not in points]
    if missing:
        raise SystemExit(f"recipe_table: {name}_pareto.csv has no {missing} point of {run['run_dir']}")
    return run, points


def training(run: Dict[str, str], label: str) -> str:
    """``memcom-pareto``'s training label, with the distillation's ``a`` and ``T`` read by the trainer's own parser."""
    cfg = parse_config(shlex.split(run.get("train_args") or ""))
    return f"{label} (a {cfg.distill_alpha:g}, T {cfg.distill_temperature:g})" if cfg.teacher else label


def table_row(name: str, dtypes: Sequence[str] = DTYPES) -> str:
    """The Markdown row of grid ``name``."""
    run, points = read_grid(name, dtypes)
    ndcg = " / ".join(f"{float(points[d]['ndcg@k']):.4f}" for d in dtypes)
    kb = " / ".join(f"{int(points[d]['pte_bytes']) / 1e3:.0f}" for d in dtypes)
    first = points[dtypes[0]]
    return (f"| {run['method']} ({float(run['item_table_ratio'] or run['compression_ratio']):.2f}x) | "
            f"{first.get('mlp') or '-'} | {training(run, first.get('training') or '-')} | {run['seed']} | "
            f"{float(run['embedding_lr']):g} | {run['epochs_run']} ({int(run['best_epoch']) + 1}) | "
            f"{float(run['valid_ndcg@k']):.4f} | {ndcg} | {kb} |")


def mean_row(names: Sequence[str], dtypes: Sequence[str]) -> str:
    """Mean ± sample standard deviation over grids ``names`` of valid nDCG@10 and each program's test nDCG@10."""
    grids = [read_grid(n, dtypes) for n in names]

    def stat(values: List[float]) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else float("nan")
        return f"{statistics.mean(values):.4f} ± {sd:.4f}"

    valid = stat([float(run["valid_ndcg@k"]) for run, _ in grids])
    ndcg = " / ".join(stat([float(points[d]["ndcg@k"]) for _, points in grids]) for d in dtypes)
    return f"| mean ± sd of {len(names)} | | | | | | {valid} | {ndcg} | |"


def main(argv: Sequence[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="+", help="grids: docs/ml1m_recipe/NAME_{results,pareto}.csv")
    parser.add_argument("--dtypes", type=lambda v: v.split(","), default=list(DTYPES),
                        help="the programs' columns, comma-separated (default fp32,int8,int4)")
    parser.add_argument("--mean", action="store_true", help="add the mean ± sd of the rows")
    args = parser.parse_args(argv)
    cols = " / ".join(args.dtypes)
    print(f"| method (ratio as stored) | MLP | training | seed | lr | epochs run (best) | valid nDCG@10 "
          f"| `.pte` nDCG@10 {cols} | KB {cols} |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.names:
        print(table_row(name, args.dtypes))
    if args.mean:
        print(mean_row(args.names, args.dtypes))


if __name__ == "__main__":
    main()
