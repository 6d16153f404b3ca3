"""Data pipeline benchmark: Parquet -> KJT batches per process, and the synthetic generator.

    python benchmarks/bench_data.py --data-dir data/ml-1m          # reader on a prepared dataset
    python benchmarks/bench_data.py --synth-interactions 20000000 --synth-items 2000000 --synth-users 1000000

Reader figures are rows (interactions) per second in one process, next to the baseline
measured in the same run: pyarrow decoding the same columns of the same files
(`pq.read_table`), i.e. the floor any Parquet reader pays. The generator runs in a
child process; its peak RSS is reported beside that of a child that only imports the
package (the baseline).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Dict

import pyarrow.compute as pc
import pyarrow.parquet as pq

from memcom_torchrec.data import InteractionBatchReader, make_dataloader, read_manifest


def _rate(fn, rows: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return rows / best


def bench_reader(data_dir: str, batch_size: int, repeats: int, workers: int) -> Dict[str, float]:
    m = read_manifest(data_dir)
    files = [os.path.join(data_dir, f["path"]) for f in m["files"]["train"]]
    rows = m["splits"]["train"]
    mean_hist = sum(pc.sum(pc.list_value_length(pq.read_table(f, columns=["history"])["history"])).as_py() for f in files) / max(rows, 1)
    out = {"rows": rows, "history_len": m["history_len"], "mean_history": mean_hist}
    out["pyarrow_read_table"] = _rate(lambda: [pq.read_table(f, columns=["user", "item", "history"]) for f in files], rows, repeats)

    def run(**kw) -> None:
        for _ in InteractionBatchReader(data_dir, "train", batch_size, **kw):
            pass

    out["reader"] = _rate(lambda: run(shuffle=False), rows, repeats)
    out["reader_shuffle"] = _rate(lambda: run(shuffle=True, shuffle_buffer=65536), rows, repeats)
    out["reader_shuffle_2ranks_rank0"] = _rate(lambda: run(shuffle=True, rank=0, world_size=2), rows // 2, repeats)
    if workers:
        def dl() -> None:
            for _ in make_dataloader(data_dir, "train", batch_size, shuffle=True, num_workers=workers):
                pass
        out[f"dataloader_{workers}_workers"] = _rate(dl, rows, repeats)

        def dl4() -> None:
            for _ in make_dataloader(data_dir, "train", 4 * batch_size, shuffle=True, num_workers=workers):
                pass
        out[f"dataloader_{workers}_workers_batch_x4"] = _rate(dl4, rows, repeats)
    return out


_CHILD = """
import json, resource, sys, time
from memcom_torchrec.data.synthetic import SynthConfig, generate_synthetic
cfg = json.loads(sys.argv[1])
if cfg:
    t0 = time.perf_counter()
    m = generate_synthetic(cfg.pop("out"), SynthConfig(**cfg), progress=False)
    print(json.dumps({"seconds": time.perf_counter() - t0, "rows": m["num_interactions"]}))
else:
    print(json.dumps({}))
"""


def _child(cfg: dict) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    r = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(cfg)], capture_output=True, text=True, check=True)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    # ru_maxrss of children is the max over all waited-for children: run the baseline first.
    out["peak_rss_mb"] = max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
    return out


def bench_synth(users: int, items: int, interactions: int, out_dir: str) -> Dict[str, float]:
    base = _child({})
    gen = _child({"out": out_dir, "num_users": users, "num_items": items, "num_interactions": interactions})
    size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(out_dir) for f in fs)
    return {
        "users": users, "items": items, "interactions": gen["rows"], "seconds": gen["seconds"],
        "rows_per_s": gen["rows"] / gen["seconds"], "peak_rss_mb": gen["peak_rss_mb"],
        "import_only_rss_mb": base["peak_rss_mb"], "output_mb": size / 2**20,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", help="prepared dataset for the reader benchmark (default: the synthetic output)")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers to also measure (0: skip)")
    p.add_argument("--synth-users", type=int, default=100_000)
    p.add_argument("--synth-items", type=int, default=200_000)
    p.add_argument("--synth-interactions", type=int, default=2_000_000, help="0: skip the generator")
    p.add_argument("--out", help="where the synthetic data goes (default: a temporary directory)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        synth_dir = args.out or os.path.join(tmp, "synth")
        if args.synth_interactions:
            s = bench_synth(args.synth_users, args.synth_items, args.synth_interactions, synth_dir)
            print(f"synthetic generator: {s['interactions']:,} interactions, {s['users']:,} users, {s['items']:,} items")
            print(f"  {s['seconds']:.1f} s = {s['rows_per_s']:,.0f} rows/s; peak RSS {s['peak_rss_mb']:,.0f} MB "
                  f"(import-only baseline {s['import_only_rss_mb']:,.0f} MB); output {s['output_mb']:,.0f} MB")
        data_dir = args.data_dir or synth_dir
        r = bench_reader(data_dir, args.batch_size, args.repeats, args.workers)
        base = r["pyarrow_read_table"]
        print(f"reader on {data_dir} (train: {r['rows']:,} rows, history_len {r['history_len']}, "
              f"mean history {r['mean_history']:.1f} ids, batch {args.batch_size}):")
        print(f"  {'':34s} {'rows/s':>12s} {'ids/s':>14s}")
        for k, v in r.items():
            if k not in ("rows", "history_len", "mean_history"):
                ids = v * (1 + r["mean_history"])
                print(f"  {k:34s} {v:>12,.0f} {ids:>14,.0f}   x{v / base:.2f} of pyarrow read_table")


if __name__ == "__main__":
    main()
