"""``memcom-pareto``: every trained model of a grid, exported at every dtype, measured as the phone runs it.

For each run of a ``memcom-experiment`` grid (its ``results.csv``) and each dtype,
the checkpoint is exported to a ``.pte`` (``export.write_programs``, parity-checked),
and the program itself, loaded by the ExecuTorch runtime, ranks the whole test
split (same protocol and metric code as training: ``eval.metrics``). Each point
records the ``.pte`` bytes, table bytes, linear-layer bytes, the median batch-1
request latency, method, ratio and dtype. Outputs in ``--out-dir``:
``pareto.csv`` (appended point by point; an interrupted run resumes), ``pareto.md``
(table, frontier, the bar) and ``pareto.png`` (nDCG@k against ``.pte`` bytes, log x,
frontier marked).

Example::

    memcom-pareto --results runs/ml1m_phone/results.csv --data-dir data/ml-1m \\
        --out-dir runs/ml1m_phone/pareto --dtypes fp32 int8 int4
"""

import argparse
import csv
import logging
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import torch
from tqdm import tqdm

from memcom_torchrec.data import make_dataloader
from memcom_torchrec.data.manifest import read_manifest
from memcom_torchrec.eval.metrics import RankingTotals, rank_batches
from memcom_torchrec.experiment.grid import read_results, rewrite_csv
from memcom_torchrec.export.cli import cli_error
from memcom_torchrec.export.lowering import XNNPACK, default_max_batch, load_pte, run_pte, write_programs
from memcom_torchrec.export.slim import DTYPES, FP32, INT4, INT8, SlimModel, build_slim_model, kjt_to_inputs
from memcom_torchrec.models.builder import load_trained_model, resolve_checkpoint
from memcom_torchrec.models.checkpoint import read_meta
from memcom_torchrec.models.config import ModelConfig
from memcom_torchrec.modules.methods import get_method
from memcom_torchrec.quiet import add_verbose_flag, configure_cli

logger = logging.getLogger(__name__)

COLUMNS = [
    "method", "compression_ratio", "item_table_ratio", "dtype", "kind", "seed", "pte_bytes", "table_bytes",
    "linear_bytes", "ndcg@k", "hr@k", "test_users", "valid_ndcg@k", "latency_ms", "parity", "run_dir", "pte",
    "training", "mlp",
]
PLAIN = "plain"


def training_of(config: Dict[str, Any]) -> str:
    """How a run was trained, as the Pareto labels it.

    Args:
        config (Dict[str, Any]): the run's ``TrainConfig`` as its checkpoint records it.

    Returns:
        str: ``plain``, ``kd``, ``qat int4``, ``kd+qat int4``..., with `` fine-tuned`` when the run
        started from another run's weights (``--init-from``).
    """
    parts = (["kd"] if config.get("teacher") else []) + ([f"qat {config['qat']}"] if config.get("qat") else [])
    return "+".join(parts or [PLAIN]) + (" fine-tuned" if config.get("init_from") else "")


def mlp_of(config: Dict[str, Any]) -> str:
    """The run's MLP widths, ``256`` or ``256-64`` (the model's default when the config has none)."""
    return "-".join(str(h) for h in config.get("hidden", ModelConfig().hidden))


DEFAULT_MLP = mlp_of({})


def label_training(points: List[Dict[str, str]]) -> bool:
    """Fills the ``training`` and ``mlp`` columns of points measured before they existed, from their runs'
    checkpoints.

    Returns:
        bool: whether any point changed.

    Raises:
        ValueError: a point without the column whose run directory is not here.
    """
    changed = False
    for p in points:
        if not p.get("training") or not p.get("mlp"):
            config = read_meta(resolve_checkpoint(p["run_dir"]))["config"]
            p["training"], p["mlp"] = training_of(config), mlp_of(config)
            changed = True
    return changed


@torch.no_grad()
def evaluate_program(
    pte: str, slim: SlimModel, data_dir: str, history_len: int, batch_size: int, k: int = 10, split: str = "test"
) -> RankingTotals:
    """nDCG@k / HR@k of a ``.pte`` run by the ExecuTorch runtime on a whole split.

    Args:
        pte (str): the program.
        slim (SlimModel): its eager model (for the input layout only: with or without user ids).
        data_dir (str): prepared dataset.
        history_len (int): history items per request (the run's).
        batch_size (int): requests per call (at most the program's ``max_batch``).
        k (int): cut-off.
        split (str): ``test`` or ``valid``.

    Returns:
        RankingTotals: sums over every user of the split.
    """
    method = load_pte(pte)
    with_user = slim.user is not None
    loader = make_dataloader(data_dir, split, batch_size, shuffle=False, history_len=history_len, num_workers=0,
                             with_user=with_user)
    return rank_batches(((run_pte(method, kjt_to_inputs(b.sparse_features, with_user)), b.labels,
                          b.exclude.lengths(), b.exclude.values()) for b in loader), k)


@torch.no_grad()
def request_latency_ms(pte: str, slim: SlimModel, history_len: int, repeats: int = 100) -> float:
    """Median wall time of one batch-1 request (``history_len`` items) through the runtime, in ms."""
    method = load_pte(pte)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, slim.num_items, (history_len,), generator=g)
    x = (ids, torch.tensor([history_len]))
    if slim.user is not None:
        x = x + (torch.zeros(1, dtype=torch.long),)
    run_pte(method, x)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run_pte(method, x)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def read_points(path: str) -> List[Dict[str, str]]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _append(path: str, row: Dict[str, object]) -> None:
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        w.writerow({c: row.get(c, "") for c in COLUMNS})


def measure_grid(
    results: str, data_dir: str, out_dir: str, dtypes: Sequence[str], batch_size: int = 256, repeats: int = 100
) -> List[Dict[str, str]]:
    """Exports and measures every run of ``results`` at every dtype (skipping points already in ``pareto.csv``).

    Raises:
        ValueError: an unknown dtype, a missing results file, run directory or prepared dataset (before any
            work; a bad dataset is a ``DataError``).
    """
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        raise ValueError(f"unknown dtype(s) {bad}; choose from {list(DTYPES)}")
    if not os.path.exists(results):
        raise ValueError(f"no results file {results}: run memcom-experiment first")
    runs = read_results(results)
    missing = [r["run_dir"] for r in runs if not os.path.isdir(r["run_dir"])]
    if missing:
        raise ValueError(f"{results} lists run directories that are not here: {missing[:3]}")
    read_manifest(data_dir)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "pareto.csv")
    points = read_points(path)
    if label_training(points):  # a pareto.csv from before the training column: upgraded in place
        rewrite_csv(path, points, COLUMNS)
    done = {(p["run_dir"], p["dtype"]) for p in points}
    todo = [(r, d) for r in runs for d in dtypes if (r["run_dir"], d) not in done]
    for run, dtype in tqdm(todo, desc="export + evaluate", mininterval=5.0):
        model, meta = load_trained_model(run["run_dir"])
        slim = build_slim_model(model, dtype)
        config = meta["config"]
        name = f"{os.path.basename(run['run_dir'].rstrip('/'))}_{dtype}.pte"
        pte = os.path.join(out_dir, "programs", name)
        max_batch = min(batch_size, default_max_batch(slim))
        res = write_programs(slim, pte, XNNPACK, pt2=None, max_batch=max_batch,
                             max_history=int(config["history_len"]), dtype=dtype, method=run["method"])
        totals = evaluate_program(pte, slim, data_dir, int(config["history_len"]), max_batch, int(config.get("k", 10)))
        row = {
            "method": run["method"], "compression_ratio": run["compression_ratio"],
            "item_table_ratio": run.get("item_table_ratio", ""), "dtype": dtype, "kind": slim.kind,
            "seed": run.get("seed", ""), "pte_bytes": res.pte_bytes, "table_bytes": res.embedding_bytes,
            "linear_bytes": res.dense_bytes, "ndcg@k": f"{totals.mean_ndcg:.6f}", "hr@k": f"{totals.mean_hr:.6f}",
            "test_users": totals.count, "valid_ndcg@k": run.get("valid_ndcg@k", ""),
            "latency_ms": f"{request_latency_ms(pte, slim, int(config['history_len']), repeats):.3f}",
            "parity": f"{res.parity_max_abs_diff:.2e}", "run_dir": run["run_dir"], "pte": pte,
            "training": training_of(config), "mlp": mlp_of(config),
        }
        logger.info("%s %s: %.1f KB, nDCG@k %.4f", run["run_dir"], dtype, res.pte_bytes / 1e3, totals.mean_ndcg)
        _append(path, row)
    return read_points(path)


def remeasure_latency(out_dir: str, repeats: int = 100) -> List[Dict[str, str]]:
    """Times every point's ``.pte`` again and rewrites ``pareto.csv`` (for a quiet machine: the
    first timings share the CPU with whatever else ran)."""
    path = os.path.join(out_dir, "pareto.csv")
    points = read_points(path)
    for p in tqdm(points, desc="latency", mininterval=5.0):
        model, meta = load_trained_model(p["run_dir"])
        slim = build_slim_model(model, p["dtype"])
        p["latency_ms"] = f"{request_latency_ms(p['pte'], slim, int(meta['config']['history_len']), repeats):.3f}"
    rewrite_csv(path, points, COLUMNS)
    return points


def _training(p: Dict[str, str]) -> str:
    return p.get("training") or "-"  # "-": a point measured before the column, not upgraded


def _other_mlp(p: Dict[str, str]) -> str:
    """The point's MLP widths where not the default (``64``), else ``""``."""
    mlp = p.get("mlp") or DEFAULT_MLP
    return "" if mlp == DEFAULT_MLP else mlp


def _name(p: Dict[str, str], with_dtype: bool = True) -> str:
    """``memcom_qr 16x int4``, with an MLP other than the default and the training when it is not plain
    (``qr 4x MLP 64 int4 (qat int4 fine-tuned)``)."""
    name = f"{p['method']} {float(p['compression_ratio']):g}x" + (f" MLP {_other_mlp(p)}" if _other_mlp(p) else "")
    name += f" {p['dtype']}" if with_dtype else ""
    return name if _training(p) == PLAIN else f"{name} ({_training(p)})"


def frontier(points: List[Dict[str, str]]) -> List[Dict[str, str]]:
    """The points no other point beats on both ``.pte`` bytes (smaller) and nDCG@k (higher); by size."""
    ordered = sorted(points, key=lambda p: (int(p["pte_bytes"]), -float(p["ndcg@k"])))
    out: List[Dict[str, str]] = []
    best = float("-inf")
    for p in ordered:
        if float(p["ndcg@k"]) > best:
            out.append(p)
            best = float(p["ndcg@k"])
    return out


def baseline(points: List[Dict[str, str]]) -> Optional[Dict[str, str]]:
    """The uncompressed fp32 point best on validation (the bar's reference), if any."""
    base = [p for p in points if not get_method(p["method"]).compresses and p["dtype"] == "fp32"]
    return max(base, key=lambda p: float(p["valid_ndcg@k"] or "nan")) if base else None


def report(out_dir: str) -> str:
    """Writes ``pareto.md`` and ``pareto.png`` from ``pareto.csv``; returns the Markdown."""
    points = read_points(os.path.join(out_dir, "pareto.csv"))
    if not points:
        raise ValueError(f"no points in {out_dir}/pareto.csv")
    front = {(p["run_dir"], p["dtype"]) for p in frontier(points)}
    base = baseline(points)
    b_bytes, b_ndcg = (int(base["pte_bytes"]), float(base["ndcg@k"])) if base else (None, None)
    lines = [
        "| method | ratio | item-table ratio | dtype | training | MLP | scorer | .pte KB | tables KB | linear KB | nDCG@10 "
        "| HR@10 | rel. loss | size vs base | latency ms | parity | frontier |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in sorted(points, key=lambda p: int(p["pte_bytes"]), reverse=True):
        ndcg = float(p["ndcg@k"])
        loss = f"{(1 - ndcg / b_ndcg) * 100:+.1f}%" if b_ndcg else "-"
        size = f"1/{b_bytes / int(p['pte_bytes']):.1f}" if b_bytes else "-"
        lines.append(
            f"| {p['method']} | {float(p['compression_ratio']):g} | {p['item_table_ratio']} | {p['dtype']} | "
            f"{_training(p)} | {p.get('mlp') or '-'} | {p['kind']} | {int(p['pte_bytes']) / 1e3:.1f} | {int(p['table_bytes']) / 1e3:.1f} | "
            f"{int(p['linear_bytes']) / 1e3:.1f} | {ndcg:.4f} | {float(p['hr@k']):.4f} | {loss} | {size} | "
            f"{float(p['latency_ms']):.2f} | {p['parity']} | {'yes' if (p['run_dir'], p['dtype']) in front else ''} |"
        )
    md = "\n".join(lines) + "\n"
    if base:
        md += (f"\nBase: uncompressed fp32 ({b_bytes / 1e3:.1f} KB, nDCG@10 {b_ndcg:.4f}, best on validation). "
               f"The bar: a MEmCom-family point at <= {b_bytes / 16e3:.1f} KB (1/16) with nDCG@10 >= "
               f"{0.95 * b_ndcg:.4f} (-5%), on the frontier.\n")
        hits = [p for p in points if get_method(p["method"]).memcom_family and int(p["pte_bytes"]) * 16 <= b_bytes
                and float(p["ndcg@k"]) >= 0.95 * b_ndcg and (p["run_dir"], p["dtype"]) in front]
        md += ("Met by: " + ", ".join(_name(p) for p in hits) if hits else "Not met by any point.") + "\n"
        owners = [f"{_name(p)} ({int(p['pte_bytes']) / 1e3:.0f} KB)" for p in frontier(points)]
        md += "Frontier, smallest first: " + "; ".join(owners) + ".\n"
    with open(os.path.join(out_dir, "pareto.md"), "w") as f:
        f.write(md)
    try:
        _plot(points, front, base, os.path.join(out_dir, "pareto.png"))
    except ImportError:
        logger.warning("matplotlib is not installed: no pareto.png (pip install 'memcom_torchrec[plot]')")
    return md


def compact_table(out_dir: str) -> str:
    """One line per program of ``pareto.csv``, largest first: what a phone user weighs.

    Columns: method and ratio (with the MLP and the training where not the default), dtype, ``.pte`` KB,
    the program's own test nDCG@10 and its change against the uncompressed fp32 program, batch-1 latency, and the ``.pte`` = eager parity.
    """
    points = read_points(os.path.join(out_dir, "pareto.csv"))
    if not points:
        raise ValueError(f"no points in {out_dir}/pareto.csv")
    base = baseline(points)
    lines = ["| model | dtype | .pte KB | nDCG@10 (.pte) | vs uncompressed fp32 | latency ms (batch 1) | parity |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for p in sorted(points, key=lambda p: int(p["pte_bytes"]), reverse=True):
        ndcg = float(p["ndcg@k"])
        change = f"{(ndcg / float(base['ndcg@k']) - 1) * 100:+.1f}%" if base and float(base["ndcg@k"]) > 0 else "-"
        lines.append(f"| {_name(p, with_dtype=False)} | {p['dtype']} | "
                     f"{int(p['pte_bytes']) / 1e3:.1f} | {ndcg:.4f} | {change} | "
                     f"{float(p['latency_ms']):.2f} | {float(p['parity']):.1e} |")
    return "\n".join(lines)


def _plot(points, front, base, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    markers = {"fp32": "o", "int8": "s", "int4": "^", "int4_row": "v"}
    methods = sorted({p["method"] for p in points})
    colours = {m: plt.cm.tab10(i) for i, m in enumerate(methods)}
    on_front = {(p["run_dir"], p["dtype"]) for p in frontier(points)}
    for p in points:  # plain training: filled markers; QAT / distillation: hollow, its tool named on the frontier
        hollow = _training(p) != PLAIN
        x, y = int(p["pte_bytes"]) / 1e3, float(p["ndcg@k"])
        ax.scatter(x, y, marker=markers.get(p["dtype"], "o"), facecolors="none" if hollow else colours[p["method"]],
                   edgecolors=colours[p["method"]], s=40, alpha=0.85)
        tag = f" mlp{_other_mlp(p)}" if _other_mlp(p) else ""
        if hollow and (p["run_dir"], p["dtype"]) in on_front:
            tag += " " + _training(p).replace(" fine-tuned", " ft").replace("qat ", "qat-")
        ax.annotate(f"{float(p['compression_ratio']):g}x{tag}", (x, y), fontsize=6, xytext=(3, 2),
                    textcoords="offset points")
    f = frontier(points)
    ax.step([int(p["pte_bytes"]) / 1e3 for p in f], [float(p["ndcg@k"]) for p in f], where="post", color="black",
            lw=1, ls="--", label="frontier")
    if base:
        b_bytes, b_ndcg = int(base["pte_bytes"]) / 1e3, float(base["ndcg@k"])
        ax.axvline(b_bytes / 16, color="grey", lw=0.8, ls=":", label="1/16 of uncompressed fp32")
        ax.axhline(0.95 * b_ndcg, color="grey", lw=0.8, ls="-.", label="-5% nDCG@10")
    for m in methods:
        ax.scatter([], [], color=colours[m], label=m)
    for d, mk in markers.items():
        ax.scatter([], [], color="black", marker=mk, label=d)  # black: tab10 gives a method grey
    if any(_training(p) != PLAIN for p in points):
        ax.scatter([], [], facecolors="none", edgecolors="black", label="QAT / distilled (hollow)")
    ax.set_xscale("log")
    ax.set_xlabel(".pte bytes (KB, log)")
    ax.set_ylabel("test nDCG@10 of the .pte")
    ax.set_title("Phone models: quality against program size")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="memcom-pareto", description=__doc__.splitlines()[0])
    p.add_argument("--results", required=True, help="results.csv of a memcom-experiment grid")
    p.add_argument("--data-dir", required=True, help="the prepared dataset the grid trained on")
    p.add_argument("--out-dir", required=True, help="where programs, pareto.csv/.md/.png go")
    p.add_argument("--dtypes", nargs="+", default=[FP32, INT8, INT4], choices=DTYPES)
    p.add_argument("--batch-size", type=int, default=256, help="requests per runtime call when evaluating")
    p.add_argument("--repeats", type=int, default=100, help="batch-1 requests timed per program (median)")
    p.add_argument("--report-only", action="store_true", help="redraw pareto.md / .png from pareto.csv")
    p.add_argument("--compact", action="store_true",
                   help="print one short table (model, dtype, KB, nDCG@10, latency, parity); pareto.md stays full")
    p.add_argument("--remeasure-latency", action="store_true",
                   help="time every program of pareto.csv again (on a quiet machine), then report")
    add_verbose_flag(p)
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    configure_cli(args.verbose)
    try:
        if args.remeasure_latency:
            remeasure_latency(args.out_dir, args.repeats)
        elif not args.report_only:
            measure_grid(args.results, args.data_dir, args.out_dir, args.dtypes, args.batch_size, args.repeats)
        full = report(args.out_dir)
        print(compact_table(args.out_dir) if args.compact else full)
    except (ImportError, ValueError) as e:
        return cli_error("memcom-pareto", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
