"""``memcom-experiment``: a grid of methods x compression ratios x seeds on one dataset.

An orchestrator at the level of ``launch/``: it runs the trainer in
subprocesses and reads their ``RunResult``; nothing imports it.

Each cell is one training run (a subprocess: ``python -m memcom_torchrec.train``
for one process, ``torchrun`` for more) with the same tuning budget: every
method tries the same embedding learning rates, the one with the best
validation nDCG@k is kept. Finished runs are appended to ``results.csv`` at
once, and runs already there are skipped, so an interrupted grid resumes.
``report`` turns the CSV into ``results.md`` and ``results.png``.
"""

import argparse
import contextlib
import csv
import fcntl
import json
import logging
import math
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from memcom_torchrec.data.manifest import read_manifest
from memcom_torchrec.modules.methods import UNCOMPRESSED, get_method, method_names
from memcom_torchrec.quiet import add_verbose_flag, configure_cli
from memcom_torchrec.train.results import RunResult

logger: logging.Logger = logging.getLogger(__name__)

FIELDS = [
    "dataset", "model", "method", "compression_ratio", "embedding_params", "embedding_bytes",
    "ndcg@k", "hr@k", "relative_loss", "seed", "train_seconds",
    "valid_ndcg@k", "item_table_ratio", "embedding_lr", "epochs_run", "best_epoch", "world_size", "run_dir",
    "train_args", "embedding_lrs", "k",
]
# Columns of versions that fixed the cut-off at 10 (their rows get k = 10).
LEGACY_COLUMNS = {"ndcg@10": "ndcg@k", "hr@10": "hr@k", "valid_ndcg@10": "valid_ndcg@k"}
# Set by the grid for each run: passing them after `--` would mislabel the rows.
GRID_FLAGS = ("--method", "--compression-ratio", "--seed", "--embedding-lr", "--data-dir", "--out-dir")
DEFAULT_RATIOS = [4.0, 16.0, 40.0]
MODEL_NAMES = {"next_item": "next-item classifier", "ranknet": "RankNet-style pairwise ranker"}


def dataset_name(data_dir: str) -> str:
    """The ``dataset`` column: the data directory's name."""
    return os.path.basename(os.path.normpath(data_dir))


def run_key(method: str, ratio: float, seed: int, lr: float) -> str:
    return f"{method}_r{ratio:g}_s{seed}_lr{lr:g}"


def parse_run_key(key: str) -> Tuple[str, float, int, float]:
    """``(method, ratio, seed, lr)`` of a run directory's name (``run_key``'s inverse).

    Raises:
        ValueError: ``key`` is not a run key.
    """
    match = re.match(r"(.+)_r([0-9.e+-]+)_s(\d+)_lr([0-9.e+-]+)$", key)
    if match is None:
        raise ValueError(f"'{key}' is not a run directory name (<method>_r<ratio>_s<seed>_lr<lr>)")
    method, ratio, seed, lr = match.groups()
    return method, float(ratio), int(seed), float(lr)


def read_results(path: str) -> List[Dict[str, str]]:
    """The rows of a results.csv (none if it does not exist); legacy ``@10`` columns read as ``@k``, k = 10."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for old, new in LEGACY_COLUMNS.items():
            if old in r:
                r[new] = r.pop(old)
                r.setdefault("k", "10")
    return rows


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """Holds an exclusive lock on ``path`` (via ``path.lock``): grids sharing an out dir never lose a row."""
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def rewrite_csv(path: str, rows: List[Dict[str, object]], fields: Sequence[str] = FIELDS) -> None:
    """Replaces a CSV (results.csv: ``FIELDS`` columns) by ``rows``, atomically."""
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows({k: r.get(k, "") for k in fields} for r in rows)
    os.replace(tmp, path)


def _check_columns(path: str) -> None:
    """Raises on a results.csv this version cannot append to; upgrades one from an older version in place.

    Older versions wrote a subset of ``FIELDS`` (no ``train_args``; ``@10`` instead
    of ``@k`` and ``k``): their rows are kept and the new columns left empty (unknown).
    """
    with open(path, newline="") as f:
        header = next(csv.reader(f), [])
    if header == FIELDS:
        return
    if not header or not {LEGACY_COLUMNS.get(h, h) for h in header} <= set(FIELDS):
        raise ValueError(f"{path}: columns {header} do not match this version's {FIELDS}; use another --out-dir")
    rewrite_csv(path, read_results(path))


def append_result(path: str, row: Dict[str, object]) -> None:
    with _locked(path):
        new = not os.path.exists(path)
        if not new:
            _check_columns(path)
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                writer.writeheader()
            writer.writerow({k: row.get(k, "") for k in FIELDS})
            f.flush()
            os.fsync(f.fileno())


def train_command(launcher: str, nproc: int, data_dir: str, run_dir: str, args: List[str]) -> List[str]:
    """The command of one training run.

    Args:
        launcher (str): ``torchx`` (the ``launch/components.py:train`` component on the
            ``local_cwd`` scheduler, run from the repository root), ``torchrun``, or
            ``python`` (one process, no launcher).
        nproc (int): processes.
        data_dir (str): prepared dataset.
        run_dir (str): the run's output directory.
        args (List[str]): trainer flags.
    """
    if launcher == "torchx":
        torchx = os.path.join(os.path.dirname(sys.executable), "torchx")
        return [torchx, "run", "-s", "local_cwd", "launch/components.py:train", "--j", f"1x{nproc}",
                "--data_dir", data_dir, "--out_dir", run_dir, "--", *args]
    base = ["--data-dir", data_dir, "--out-dir", run_dir, *args]
    if launcher == "python" or nproc <= 1:
        return [sys.executable, "-m", "memcom_torchrec.train", *base]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "memcom_torchrec.train", *base]


def run_one(
    data_dir: str, out_dir: str, method: str, ratio: float, seed: int, lr: float, nproc: int, extra: Sequence[str],
    launcher: str = "torchrun",
) -> Dict[str, object]:
    """Trains one cell (or reuses its finished metrics.json) and returns its row."""
    run_dir = os.path.join(out_dir, "runs", run_key(method, ratio, seed, lr))
    metrics_path = os.path.join(run_dir, "metrics.json")
    args_path = os.path.join(run_dir, "experiment_args.json")
    extra = list(extra)
    if os.path.exists(args_path):
        with open(args_path) as f:
            before = json.load(f)
        if before != extra:
            raise ValueError(
                f"{run_dir} was trained with extra args {before}, this grid passes {extra}; use another --out-dir"
            )
    if not os.path.exists(metrics_path):
        os.makedirs(run_dir, exist_ok=True)
        with open(args_path, "w") as f:
            json.dump(extra, f)
        args = ["--method", method, "--compression-ratio", str(ratio), "--seed", str(seed), "--embedding-lr", str(lr),
                *extra]
        cmd = train_command(launcher, nproc, data_dir, run_dir, args)
        logger.info("running %s", " ".join(cmd))
        started = time.time()
        # The launchers run `torchrun` from PATH: put this interpreter's environment first.
        env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
        # One thread share per process (torchrun would pick 1 and print a banner saying so).
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        with open(os.path.join(out_dir, "runs", run_key(method, ratio, seed, lr) + ".log"), "w") as log:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"run {run_dir} failed (exit {proc.returncode}); see its .log next to it")
        logger.info("finished %s in %.0fs", run_dir, time.time() - started)
    m = RunResult.load(run_dir)
    return {
        "dataset": dataset_name(data_dir),
        "model": m.config.get("model", "next_item"),
        "method": method,
        "compression_ratio": m.target_compression_ratio,
        "embedding_params": m.embedding_params,
        "embedding_bytes": m.embedding_bytes,
        "ndcg@k": m.test_ndcg,
        "hr@k": m.test_hr,
        "k": m.k,
        "seed": seed,
        "train_seconds": round(m.train_seconds, 1),
        "valid_ndcg@k": m.valid_ndcg,
        "item_table_ratio": round(m.table_compression_ratios.get("item", 1.0), 3),
        "embedding_lr": lr,
        "epochs_run": m.epochs_run,
        "best_epoch": m.best_epoch,
        "world_size": m.world_size,
        "run_dir": run_dir,
        "train_args": " ".join(extra),
    }


def cells(
    methods: Sequence[str], ratios: Sequence[float], seeds: Sequence[int], extra_seeds_at: Dict[float, Sequence[int]]
) -> List[Tuple[str, float, int]]:
    """(method, ratio, seed) of the grid; uncompressed runs once per seed."""
    out = []
    all_seeds = sorted(set(seeds) | {s for v in extra_seeds_at.values() for s in v})
    for method in methods:
        if not get_method(method).compresses:
            out += [(method, 1.0, s) for s in all_seeds]
            continue
        for r in ratios:
            for s in sorted(set(seeds) | set(extra_seeds_at.get(r, []))):
                out.append((method, r, s))
    return out


def unreachable(data_dir: str, method: str, ratio: float, train_args: Sequence[str]) -> Optional[str]:
    """Why ``method`` cannot build this dataset's tables at ``ratio`` (``None`` if it can).

    Each method's maximum comes from the registry (QR needs ``ceil(n/p) + p`` rows, so it
    tops out near ``n / (2 sqrt(n))``: about 30x on ML-1M's 3,706 items); the grid skips
    such cells up front instead of failing hours in.

    Args:
        data_dir (str): prepared dataset (its manifest gives the table sizes).
        method (str): embedding method.
        ratio (float): target compression ratio.
        train_args (Sequence[str]): the grid's training flags (``--compressed-tables``, ``--embedding-dim``).

    Returns:
        Optional[str]: the config error, or ``None``.
    """
    if not get_method(method).compresses:
        return None
    from memcom_torchrec.models.builder import embedding_tables
    from memcom_torchrec.train.cli import parse_config

    cfg = parse_config([*train_args, "--data-dir", data_dir, "--method", method, "--compression-ratio", str(ratio)])
    manifest = read_manifest(data_dir)
    try:
        embedding_tables(cfg, int(manifest["num_users"]), int(manifest["num_items"]))
    except ValueError as e:
        return str(e)
    return None


def run_grid(args: argparse.Namespace) -> None:
    os.makedirs(os.path.join(args.out_dir, "runs"), exist_ok=True)
    csv_path = os.path.join(args.out_dir, "results.csv")
    done = {(r["method"], float(r["compression_ratio"]), int(r["seed"])): r for r in read_results(csv_path)}
    wanted = {
        "dataset": dataset_name(args.data_dir),
        "train_args": " ".join(args.train_args),
        "embedding_lrs": " ".join(f"{lr:g}" for lr in sorted(args.embedding_lrs)),
    }
    extra = {16.0: args.seeds_at_16} if args.seeds_at_16 else {}
    grid = cells(args.methods, args.ratios, args.seeds, extra)
    for method, ratio in sorted({(m, r) for m, r, _ in grid}):
        why = unreachable(args.data_dir, method, ratio, args.train_args)
        if why is not None:
            print(f"memcom-experiment: skipping {method} at {ratio:g}x: {why}", file=sys.stderr)
            grid = [c for c in grid if (c[0], c[1]) != (method, ratio)]
    if not grid and not done:
        raise ValueError(f"every cell was skipped, nothing ran ({csv_path} has no results): choose reachable "
                         "--methods / --ratios")
    for method, ratio, seed in grid:  # finished cells must match this grid, checked before any work
        for key, value in wanted.items():
            before = done.get((method, ratio, seed), {}).get(key) or ""
            if before and before != value:  # empty: a row from a version that did not record it
                raise ValueError(
                    f"{csv_path}: {method} {ratio:g}x seed {seed} has {key} '{before}', this grid "
                    f"passes '{value}'; use another --out-dir"
                )
    from tqdm import tqdm

    for method, ratio, seed in tqdm(grid, desc="grid"):
        if (method, ratio, seed) in done:
            continue
        # Same tuning budget for every method: each learning rate, best on validation.
        rows = [run_one(args.data_dir, args.out_dir, method, ratio, seed, lr, args.nproc, args.train_args, args.launcher)
                for lr in args.embedding_lrs]
        best = max(rows, key=_valid_score)
        append_result(csv_path, dict(best, embedding_lrs=wanted["embedding_lrs"]))
    report(args.out_dir, args.data_dir)


def _valid_score(row: Dict[str, object]) -> float:
    """The selection key: validation nDCG@k, a NaN (diverged run) counting as the worst."""
    v = float(row["valid_ndcg@k"])  # pyre-ignore
    return float("-inf") if math.isnan(v) else v


def _is_baseline(method: str) -> bool:
    """The uncompressed baseline (rows may name methods this version no longer registers)."""
    return method == UNCOMPRESSED.name


def _relative_loss(rows: List[Dict[str, str]]) -> None:
    base = [float(r["ndcg@k"]) for r in rows if _is_baseline(r["method"])]
    ref = statistics.mean(base) if base else float("nan")
    for r in rows:
        r["relative_loss"] = (ref - float(r["ndcg@k"])) / ref if base and ref > 0 else float("nan")


def _method_order(method: str) -> tuple:
    """Registration order; methods this version no longer registers go last, by name."""
    names = method_names()
    return (names.index(method) if method in names else len(names), method)


def report(out_dir: str, data_dir: Optional[str] = None, threshold: float = 0.04) -> str:
    """Writes results.md (table) and results.png (nDCG@k vs compression ratio per method)."""
    csv_path = os.path.join(out_dir, "results.csv")
    with _locked(csv_path):  # another grid may append meanwhile
        rows = read_results(csv_path)
        if not rows:
            raise ValueError(f"no results in {csv_path}")
        _check_columns(csv_path)  # refuses a foreign file before it is rewritten below
        _relative_loss(rows)
        rewrite_csv(csv_path, rows)  # the relative losses, written back
    pop = None
    if data_dir is not None:
        from memcom_torchrec.eval.popularity import popularity_totals

        pop = popularity_totals(data_dir)
    ks = sorted({r.get("k") or "10" for r in rows})
    if len(ks) > 1:
        raise ValueError(f"{csv_path} mixes cut-offs k = {ks}: one report per k; use another --out-dir")
    k = ks[0]
    groups: Dict[tuple, List[Dict[str, str]]] = {}
    for r in rows:
        groups.setdefault((r["method"], float(r["compression_ratio"])), []).append(r)
    lines = [
        f"Dataset: {rows[0]['dataset']}, model: {MODEL_NAMES.get(rows[0]['model'], rows[0]['model'])}, "
        f"metric: full-ranking test nDCG@{k} / HR@{k} "
        "(leave-last-out, seen items excluded). Embedding lr: the cell's learning rate (with several "
        "`--embedding-lrs`, the one best on validation).",
        "",
        f"| method | ratio (target) | item-table ratio | embedding params | embedding MB | embedding lr | valid nDCG@{k} "
        f"| nDCG@{k} | HR@{k} | rel. loss | seeds | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    if pop is not None:
        lines.append(f"| popularity | - | - | 0 | 0 | - | - | {pop.mean_ndcg:.4f} | {pop.mean_hr:.4f} | - | - | 0 |")
    for (method, ratio), rs in sorted(groups.items(), key=lambda kv: (_method_order(kv[0][0]), kv[0][1])):
        nd = [float(r["ndcg@k"]) for r in rs]
        hr = [float(r["hr@k"]) for r in rs]
        rl = [float(r["relative_loss"]) for r in rs]
        spread = f" ± {statistics.stdev(nd):.4f}" if len(nd) > 1 else ""
        lines.append(
            f"| {method} | {ratio:g} | {float(rs[0]['item_table_ratio']):.2f} | {int(rs[0]['embedding_params']):,} | "
            f"{int(rs[0]['embedding_bytes']) / 1e6:.2f} | {', '.join(sorted({r['embedding_lr'] for r in rs}))} | "
            f"{statistics.mean(float(r['valid_ndcg@k']) for r in rs):.4f} | {statistics.mean(nd):.4f}{spread} | {statistics.mean(hr):.4f} | "
            f"{100 * statistics.mean(rl):.1f}% | {len(rs)} | {statistics.mean(float(r['train_seconds']) for r in rs):.0f} |"
        )
    lines += ["", f"Largest compression ratio within {100 * threshold:.0f}% relative nDCG@{k} loss (mean over seeds):", ""]
    if not any(_is_baseline(m) for m, _ in groups):
        lines.append("- no uncompressed run in these results: relative losses are unknown")
    for method in sorted({m for m, _ in groups if not _is_baseline(m)}, key=_method_order):
        ok = [r for (m, r), rs in groups.items() if m == method
              and statistics.mean(float(x["relative_loss"]) for x in rs) <= threshold]
        lines.append(f"- {method}: {max(ok):g}x" if ok else f"- {method}: none of the ratios tried")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(text)
    _plot(groups, pop, os.path.join(out_dir, "results.png"), rows[0]["dataset"], k)
    print(text)
    return text


def _plot(groups, pop, path: str, dataset: str, k: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    base = [x for (m, _), rs in groups.items() if _is_baseline(m) for x in rs]
    for method in sorted({m for m, _ in groups if not _is_baseline(m)}, key=_method_order):
        pts = sorted((r, [float(x["ndcg@k"]) for x in rs]) for (m, r), rs in groups.items() if m == method)
        xs = [r for r, _ in pts]
        ys = [statistics.mean(v) for _, v in pts]
        es = [statistics.stdev(v) if len(v) > 1 else 0.0 for _, v in pts]
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=method)
    if base:
        ax.axhline(statistics.mean(float(x["ndcg@k"]) for x in base), color="k", ls="--", label=UNCOMPRESSED.name)
        ax.axhline(0.96 * statistics.mean(float(x["ndcg@k"]) for x in base), color="gray", ls=":", label="-4% relative")
    if pop is not None:
        ax.axhline(pop.mean_ndcg, color="r", ls="-.", label="popularity")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("compression ratio of the item table (log2)")
    ax.set_ylabel(f"test nDCG@{k}")
    ax.set_title(f"{dataset}: quality vs compression")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Methods x compression ratios x seeds on a prepared dataset.")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--methods", nargs="+", default=method_names(), choices=method_names())
    p.add_argument("--ratios", nargs="+", type=float, default=DEFAULT_RATIOS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--seeds-at-16", nargs="*", type=int, default=[], help="extra seeds at 16x (spread)")
    p.add_argument("--embedding-lrs", nargs="+", type=float, default=[0.05], help="the tuning budget, same for all")
    p.add_argument("--nproc", type=int, default=1, help="processes per run")
    p.add_argument("--launcher", choices=["torchx", "torchrun", "python"], default="torchrun",
                   help="torchx: launch/components.py:train on local_cwd (run from the repo root)")
    p.add_argument("--report-only", action="store_true")
    add_verbose_flag(p)
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: flags passed to every training run")
    args = p.parse_args(argv)
    if args.train_args and args.train_args[0] == "--":
        args.train_args = args.train_args[1:]
    clash = [a for a in args.train_args if a.split("=")[0] in GRID_FLAGS]
    if clash:
        p.error(f"{clash} after '--': the grid sets {', '.join(GRID_FLAGS)} itself")
    read_manifest(args.data_dir)  # fail fast on a bad data dir
    return args


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``memcom-experiment``. Returns the exit status (1 when nothing ran)."""
    args = parse_args(argv)
    configure_cli(args.verbose)
    try:
        if args.report_only:
            report(args.out_dir, args.data_dir)
        else:
            run_grid(args)
    except (ValueError, RuntimeError) as e:  # a DataError is a ValueError
        print(f"memcom-experiment: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
