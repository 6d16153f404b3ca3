"""Per-request latency and file sizes of exported models (any model kind and scorer, every export dtype).

Latency: one request (batch 1, a history of ``--history`` items) through the
eager TorchRec model, the eager slim model, and the ``.pte`` programs (portable
kernels only, and XNNPACK) run by ExecuTorch's runtime on this CPU; median of
``--repeats`` calls after warm-up. Sizes: the ``.pte`` files of the fp32
uncompressed run (``--baseline``, if given), the exports of
``--checkpoint`` at every dtype (fp32, int8, int4, int4_row); ratios are to the first row of each table. (``memcom-pareto``
measures whole grids, with each program's own nDCG.)

    .venv/bin/python benchmarks/bench_export.py --checkpoint /tmp/run1 --baseline /tmp/run_unc
"""

import argparse
import os
import statistics
import tempfile
import time
from typing import Callable, Dict, List

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from memcom_torchrec.export import (
    DTYPES,
    build_slim_model,
    embedding_bytes,
    load_pte,
    load_trained_model,
    run_pte,
    write_programs,
)


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 20) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="run to benchmark (MEmCom)")
    p.add_argument("--baseline", default="", help="uncompressed run for the size baseline")
    p.add_argument("--data-dir", default="", help="prepared dataset: also report test nDCG@10 of each dtype's eager twin")
    p.add_argument("--history", type=int, default=50)
    p.add_argument("--repeats", type=int, default=300)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads for the eager models")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = tempfile.mkdtemp(prefix="bench_export_")

    model, meta = load_trained_model(args.checkpoint)
    slim = build_slim_model(model)
    with_user = slim.user is not None
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, slim.num_items, (args.history,), generator=g)
    lengths = torch.tensor([args.history])
    users = torch.randint(0, slim.user.info.num_embeddings, (1,), generator=g) if with_user else None
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["history", "user_id"], values=torch.cat([ids, users]), lengths=torch.tensor([args.history, 1])
    ) if with_user else KeyedJaggedTensor.from_lengths_sync(keys=["history"], values=ids, lengths=lengths)
    inner = model.model
    torchrec_scores = inner.score_all if hasattr(inner, "score_all") else inner

    sizes: List[Dict[str, object]] = []
    if args.baseline:
        base_model, base_meta = load_trained_model(args.baseline)
        base = build_slim_model(base_model)
        r = write_programs(base, os.path.join(out, "uncompressed_fp32.pte"), "xnnpack", dtype="fp32")
        sizes.append({"name": f"{base_meta['config']['method']} fp32", "r": r, "emb": embedding_bytes(base)})
    programs = {}
    for dtype in DTYPES:
        s = build_slim_model(model, dtype)
        for backend in ("portable", "xnnpack"):
            r = write_programs(s, os.path.join(out, f"{dtype}_{backend}.pte"), backend, dtype=dtype)
            programs[(dtype, backend)] = r
            if backend == "xnnpack":
                sizes.append({"name": f"{meta['config']['method']} {dtype}", "r": r, "emb": embedding_bytes(s)})

    x = (ids, lengths, users) if with_user else (ids, lengths)
    rows = []
    with torch.no_grad():
        rows.append(("eager TorchRec model", median_ms(lambda: torchrec_scores(kjt), args.repeats)))
        rows.append(("eager slim model (fp32)", median_ms(lambda: slim(*x), args.repeats)))
    for (dtype, backend), r in programs.items():
        method = load_pte(r.pte)
        rows.append((f".pte {dtype} {backend}", median_ms(lambda: run_pte(method, x), args.repeats)))

    print(f"checkpoint: {args.checkpoint} (method {meta['config']['method']}); request: batch 1, "
          f"history {args.history}; torch threads {args.threads}; median of {args.repeats}")
    print("\n| model | latency (ms) | vs eager TorchRec |\n|---|---:|---:|")
    for name, ms in rows:
        print(f"| {name} | {ms:.3f} | {ms / rows[0][1]:.2f}x |")
    print("\n| export (XNNPACK .pte) | .pte bytes | vs first | embedding bytes | vs first | .pt2 bytes |")
    print("|---|---:|---:|---:|---:|---:|")
    for s in sizes:
        r = s["r"]
        print(f"| {s['name']} | {r.pte_bytes:,} | {r.pte_bytes / sizes[0]['r'].pte_bytes:.3f} | {s['emb']:,} | "
              f"{s['emb'] / sizes[0]['emb']:.3f} | {r.pt2_bytes:,} |")
    if args.data_dir:
        from memcom_torchrec.data import make_dataloader
        from memcom_torchrec.eval.metrics import rank_batches
        from memcom_torchrec.export import kjt_to_inputs

        def scored(m):  # pyre-ignore[2,3]
            for batch in make_dataloader(args.data_dir, "test", 1024, history_len=meta["config"]["history_len"],
                                         num_workers=0, with_user=with_user):
                ex = batch.exclude
                yield m(*kjt_to_inputs(batch.sparse_features, with_user)), batch.labels, ex.lengths(), ex.values()

        twins = {dtype: build_slim_model(model, dtype) for dtype in DTYPES}
        with torch.no_grad():
            totals = {k: rank_batches(scored(m), 10) for k, m in twins.items()}
        a = totals["fp32"].mean_ndcg
        print(f"\ntest nDCG@10 ({totals['fp32'].count} users): " + ", ".join(
            f"{k} {t.mean_ndcg:.5f} ({(t.mean_ndcg - a) / a * 100:+.2f}%)" for k, t in totals.items()))
    portable = programs[("fp32", "portable")]
    print(f"\nportable-only fp32 .pte: {portable.pte_bytes:,} bytes; operators: {', '.join(portable.operators)}")


if __name__ == "__main__":
    main()
