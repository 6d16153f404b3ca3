"""The scale run: the real trainer on 2 gloo processes over 20M synthetic interactions and 2M items.

For each method, launches ``memcom_torchrec.train`` with torchrun (2 local
processes, gloo on CPU) on a ``memcom-data synth`` dataset, RankNet (sampled
negatives, so the output side does not grow with the catalogue), a fixed number
of steps (default: one epoch), then full-ranking nDCG@10 over every item for a
fixed sample of users (the first ``--eval-users`` of the valid and test splits).
Prints, per run and rank, what the trainer measured (``RunResult.rank_stats``):
training interactions/s, peak RSS, embedding parameter and optimizer bytes.

    .venv/bin/python benchmarks/bench_scale.py     # 20M / 2M: memcom, uncompressed, qr and hashing (16x)
    .venv/bin/python benchmarks/bench_scale.py --interactions 200000 --users 10000 --items 20000 \\
        --max-steps 20 --eval-users 64                                 # the tiny version CI runs

Outputs ``OUT/scale.csv`` and ``OUT/scale.md``; the data is generated once into
``--data-dir`` (kept between runs).
"""

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from typing import Any, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = [
    "method", "ratio", "steps", "batch_per_rank", "wall_s", "train_s_max", "rows_per_s_rank0", "rows_per_s_rank1",
    "rows_per_s_total", "train_peak_rss_mb_max", "peak_rss_mb_max", "embedding_param_mb_rank0", "embedding_param_mb_rank1",
    "embedding_optimizer_mb_rank0", "embedding_optimizer_mb_rank1", "embedding_param_mb_total", "embedding_mb_total", "eval_users",
    "test_ndcg@10", "test_ndcg@10_se", "test_hr@10",
]


def parse_args(argv: List[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="/tmp/memcom_scale/synth", help="synthetic data (generated if missing)")
    p.add_argument("--out", default="runs/scale", help="run directories, scale.csv and scale.md")
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--items", type=int, default=2_000_000)
    p.add_argument("--interactions", type=int, default=20_000_000)
    p.add_argument("--methods", nargs="+", default=["memcom", "uncompressed", "qr", "hashing"])
    p.add_argument("--ratio", type=float, default=16.0)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: one full epoch)")
    p.add_argument("--batch-size", type=int, default=2048, help="per rank")
    p.add_argument("--eval-users", type=int, default=2048, help="users ranked against all items (valid and test)")
    p.add_argument("--eval-batch-size", type=int, default=128, help="per rank (scores: batch x items floats)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per process")
    return p.parse_args(argv)


def ensure_data(args: argparse.Namespace) -> None:
    if os.path.exists(os.path.join(args.data_dir, "manifest.json")):
        return
    cmd = [
        os.path.join(os.path.dirname(sys.executable), "memcom-data"), "synth", "--users", str(args.users),
        "--items", str(args.items), "--interactions", str(args.interactions), "--out", args.data_dir,
    ]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def run_method(args: argparse.Namespace, method: str) -> Dict[str, Any]:
    out_dir = os.path.join(args.out, method)
    flags = [
        "--data-dir", args.data_dir, "--out-dir", out_dir, "--model", "ranknet", "--method", method,
        "--compressed-tables", "item", "user", "--compression-ratio", str(args.ratio),
        "--batch-size", str(args.batch_size), "--max-steps", str(args.max_steps), "--epochs", "1",
        "--eval-users", str(args.eval_users), "--eval-batch-size", str(args.eval_batch_size),
        "--history-len", "20", "--device", "cpu",
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           "-m", "memcom_torchrec.train", *flags]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    with open(os.path.join(out_dir, "metrics.json")) as f:
        m = json.load(f)
    stats = m["rank_stats"]
    mb = 2.0**20
    rate = [s["train_rows_per_second"] for s in stats]
    return {
        "method": method,
        "ratio": round(m["compression_ratio"], 2),
        "steps": m["steps"],
        "batch_per_rank": args.batch_size,
        "wall_s": round(wall, 1),
        "train_s_max": round(max(s["train_seconds"] for s in stats), 1),
        "rows_per_s_rank0": round(rate[0]),
        "rows_per_s_rank1": round(rate[1]) if len(rate) > 1 else "",
        "rows_per_s_total": round(sum(rate)),
        "train_peak_rss_mb_max": round(max(s["train_peak_rss_mb"] for s in stats)),
        "peak_rss_mb_max": round(max(s["peak_rss_mb"] for s in stats)),
        "embedding_param_mb_rank0": round(stats[0]["embedding_param_bytes"] / mb, 3),
        "embedding_param_mb_rank1": round(stats[1]["embedding_param_bytes"] / mb, 3) if len(stats) > 1 else "",
        "embedding_optimizer_mb_rank0": round(stats[0]["embedding_optimizer_bytes"] / mb, 3),
        "embedding_optimizer_mb_rank1": round(stats[1]["embedding_optimizer_bytes"] / mb, 3) if len(stats) > 1 else "",
        "embedding_param_mb_total": round(sum(s["embedding_param_bytes"] for s in stats) / mb, 3),
        "embedding_mb_total": round(sum(s["embedding_param_bytes"] + s["embedding_optimizer_bytes"] for s in stats) / mb, 3),
        "eval_users": m["test_users"],
        "test_ndcg@10": round(m["test_ndcg"], 4),
        "test_ndcg@10_se": round(m["test_ndcg_se"], 4),
        "test_hr@10": round(m["test_hr"], 4),
    }


def markdown(rows: List[Dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows]
    base = next((r for r in rows if r["method"] == "uncompressed"), None)
    for r in rows:
        if base is not None and r is not base:
            lines.append(
                f"\n{r['method']} / uncompressed: interactions/s {r['rows_per_s_total'] / base['rows_per_s_total']:.2f}x; "
                f"embedding parameters {base['embedding_param_mb_total'] / r['embedding_param_mb_total']:.1f}x smaller, "
                f"parameters + optimizer state {base['embedding_mb_total'] / r['embedding_mb_total']:.1f}x smaller"
            )
    return "\n".join(lines) + "\n"


def main(argv: List[str]) -> int:
    args = parse_args(argv)
    ensure_data(args)
    os.makedirs(args.out, exist_ok=True)
    rows = [run_method(args, method) for method in args.methods]
    with open(os.path.join(args.out, "scale.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    table = markdown(rows)
    with open(os.path.join(args.out, "scale.md"), "w") as f:
        f.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
