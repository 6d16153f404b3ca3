"""Sharded MEmCom collection against stock sharded EBCs on 2 gloo processes.

Variants, same features and batches on every rank (batches differ per rank):

  memcom           MEmComEmbeddingBagCollection of MEmCom tables (n, d, compression ratio),
                   MEmComEmbeddingBagCollectionSharder
  stock            TorchRec EmbeddingBagCollection of uncompressed n x d tables, unweighted
  stock_weighted   the same with is_weighted=True and a float32 per-sample weight per id
                   (MEmCom carries a float32 per id through the input all-to-all, so this is
                   the like-for-like baseline for communication)
  memcom_2hash     MEmCom with a second hash (two rows of U and two scalars per id)
  memcom_stored    MEmCom with a stored assignment (a random one-to-one map, int32 for 2M ids)

All use the same fused params (EXACT_ROWWISE_ADAGRAD, lr 0.01) and the same sharding type
(--sharding table_wise: --num-tables tables, placed by the planner, default 2 = one per rank;
--sharding row_wise: one table split over the ranks). Each step is forward + backward + fused
update with loss = sum(output * fixed random projection). Variants are interleaved in rounds;
step time is the median over rounds of the slowest rank's mean step time.

Communication is counted by wrapping torch.distributed's collectives (all_to_all_single,
all_to_all, the functional all_to_all_single, all_reduce, all_gather*, reduce_scatter*) in
separate, untimed steps: bytes of the input tensor of every call, split into forward and
backward and labelled by TorchRec's call site (KJT input all-to-all of splits / lengths /
values / weights, pooled-embedding output all-to-all, ...). "off-rank" is what leaves the
rank: all-to-all / reduce-scatter input less the own chunk, all-gather input x (world-1),
all-reduce payload.

    .venv/bin/python benchmarks/bench_sharded.py                          # TW, 2 tables
    .venv/bin/python benchmarks/bench_sharded.py --sharding row_wise --num-tables 1
    .venv/bin/python benchmarks/bench_sharded.py --variants memcom memcom_2hash memcom_stored stock  # the MEmCom-family variants
"""

import argparse
import datetime
import logging
import os
import socket
import statistics
import sys
import time
import warnings
from collections import defaultdict
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingEnv

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from memcom_torchrec import (  # noqa: E402
    MEmComEmbeddingBagCollection,
    MEmComEmbeddingBagCollectionSharder,
    MEmComEmbeddingBagConfig,
    table_memory,
)
from memcom_torchrec.train.rank_stats import local_tensor_bytes  # noqa: E402

log = logging.getLogger("bench_sharded")
VARIANTS = ["memcom", "stock", "stock_weighted", "memcom_2hash", "memcom_stored"]
# The MEmCom-family variants' table options (memcom_stored: a stored assignment, here a random one-to-one map).
MEMCOM_OPTIONS = {"memcom": {}, "memcom_2hash": {"num_hashes": 2}, "memcom_stored": {"assignment": "clustered"}}
OPTIMIZERS = {
    "sgd": EmbOptimType.EXACT_SGD,
    "adagrad": EmbOptimType.EXACT_ADAGRAD,
    "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- comm counting
class CommCounter:
    """Wraps torch.distributed collectives; records (phase, site, op) -> [calls, bytes, off-rank bytes]."""

    def __init__(self) -> None:
        self.enabled = False
        self.phase = "fwd"
        self.records: Dict[Tuple[str, str, str], List[int]] = defaultdict(lambda: [0, 0, 0])
        self._rank = 0
        self._world = 1

    def install(self) -> None:
        self._rank, self._world = dist.get_rank(), dist.get_world_size()
        import torch.distributed._functional_collectives as fc

        def a2a_single(a, kw):  # dist.all_to_all_single(output, input, out_splits, in_splits, group, async_op)
            inp = kw.get("input", a[1] if len(a) > 1 else None)
            splits = kw.get("input_split_sizes", a[3] if len(a) > 3 else None)
            return inp, splits

        def fc_a2a_single(a, kw):  # functional all_to_all_single(input, output_split_sizes, input_split_sizes, group)
            inp = a[0] if a else kw.get("self", kw.get("input"))
            splits = kw.get("input_split_sizes", a[2] if len(a) > 2 else None)
            return inp, splits

        def a2a(a, kw):  # all_to_all(output_list, input_list, ...)
            return list(kw.get("input_tensor_list", a[1] if len(a) > 1 else [])), "list"

        def first(a, kw):  # all_reduce(tensor), all_gather(list, tensor) -> tensor is a[1]
            return (a[0] if a else next(iter(kw.values()))), None

        def second(a, kw):  # all_gather(list, tensor), all_gather_into_tensor(out, in), reduce_scatter_tensor(out, in)
            return (a[1] if len(a) > 1 else list(kw.values())[1]), None

        def rs_list(a, kw):  # reduce_scatter(output, input_list)
            return list(a[1] if len(a) > 1 else kw["input_list"]), "list"

        self._wrap(dist, "all_to_all_single", a2a_single)
        self._wrap(dist, "all_to_all", a2a)
        self._wrap(fc, "all_to_all_single", fc_a2a_single)
        self._wrap(dist, "all_reduce", first)
        self._wrap(dist, "all_gather", second)
        self._wrap(dist, "all_gather_into_tensor", second)
        self._wrap(dist, "reduce_scatter_tensor", second)
        self._wrap(dist, "reduce_scatter", rs_list)

    def _wrap(self, mod: Any, name: str, extract: Callable) -> None:
        orig = getattr(mod, name, None)
        if orig is None:
            return
        counter = self

        def wrapper(*a: Any, **kw: Any) -> Any:
            if counter.enabled:
                try:
                    counter._record(name, extract(a, kw))
                except Exception as e:  # counting must never break the step
                    log.warning("could not count %s: %s", name, e)
            return orig(*a, **kw)

        wrapper.__wrapped__ = orig  # type: ignore[attr-defined]
        setattr(mod, name, wrapper)

    def _site(self) -> str:
        f = sys._getframe(3)
        while f is not None:
            fn = f.f_code.co_filename
            if ("torchrec" in fn or "memcom_torchrec" in fn) and "torch/distributed" not in fn:
                base = os.path.basename(fn)
                if base == "dist_data.py":
                    if "label" in f.f_locals:
                        return f"input a2a: {f.f_locals['label']}"
                    if "input_tensors" in f.f_locals:
                        return "input a2a: splits"
                    return f"dist_data:{f.f_code.co_name}"
                if base == "comm_ops.py":
                    return "output: pooled embs"
                if base == "memcom_embeddingbag.py":
                    return "memcom: validate"
                return f"{base}:{f.f_code.co_name}"
            f = f.f_back
        return "other"

    def _record(self, op: str, extracted: Tuple[Any, Any]) -> None:
        inp, splits = extracted
        if splits == "list":
            total = sum(t.numel() * t.element_size() for t in inp)
            off = total - (inp[self._rank].numel() * inp[self._rank].element_size() if len(inp) == self._world else 0)
        else:
            total = inp.numel() * inp.element_size()
            if "all_to_all" in op:
                if splits is None:
                    off = total - total // self._world
                else:
                    rows = inp.shape[0] if inp.dim() > 0 else 1
                    per_row = total // max(rows, 1)
                    off = total - int(splits[self._rank]) * per_row
            elif op.startswith("reduce_scatter"):
                off = total - total // self._world  # the own chunk stays local
            elif op.startswith("all_gather"):
                off = total * (self._world - 1)  # the input goes to every other rank
            else:
                off = total  # all_reduce: payload size
        rec = self.records[(self.phase, self._site(), op)]
        rec[0] += 1
        rec[1] += total
        rec[2] += off


COUNTER = CommCounter()


# ---------------------------------------------------------------- models and data
class CpuRowWiseEBCSharder(EmbeddingBagCollectionSharder):
    """Stock EBC sharder that also offers row_wise to the planner on CPU.

    TorchRec's sharder lists ROW_WISE only for CUDA, but its row-wise sharding runs on
    CPU/gloo (the MEmCom sharder shards its inner EBC row-wise with this same class).
    """

    def sharding_types(self, compute_device_type: str) -> List[str]:
        types = super().sharding_types(compute_device_type)
        return types + [t for t in ("row_wise",) if t not in types]


def table_configs(args: argparse.Namespace, variant: str) -> List[EmbeddingBagConfig]:
    out: List[EmbeddingBagConfig] = []
    for t in range(args.num_tables):
        kw = dict(name=f"t{t}", num_embeddings=args.num_embeddings, embedding_dim=args.dim, feature_names=[f"f{t}"])
        if variant in MEMCOM_OPTIONS:
            out.append(MEmComEmbeddingBagConfig(compression_ratio=args.ratio, **kw, **MEMCOM_OPTIONS[variant]))
        else:
            out.append(EmbeddingBagConfig(**kw))
    return out


def build(args: argparse.Namespace, variant: str) -> DistributedModelParallel:
    fused = {"optimizer": OPTIMIZERS[args.optimizer], "learning_rate": args.lr}
    tables = table_configs(args, variant)
    meta = torch.device("meta")
    if variant in MEMCOM_OPTIONS:
        model: torch.nn.Module = MEmComEmbeddingBagCollection(tables, device=meta)
        sharder: Any = MEmComEmbeddingBagCollectionSharder(fused_params=fused, validate_inputs=not args.no_validate)
    else:
        model = EmbeddingBagCollection(tables=tables, is_weighted=variant == "stock_weighted", device=meta)
        sharder = CpuRowWiseEBCSharder(fused_params=fused)
    constraints = {t.name: ParameterConstraints(sharding_types=[args.sharding]) for t in tables}
    world = dist.get_world_size()
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=world, compute_device="cpu"), constraints=constraints)
    plan = planner.collective_plan(model, [sharder], dist.group.WORLD)
    dmp = DistributedModelParallel(
        model, env=ShardingEnv.from_process_group(dist.group.WORLD), device=torch.device("cpu"), plan=plan, sharders=[sharder]
    )
    for t in tables:
        if getattr(t, "stores_assignment", False):  # the same random map on every rank
            g = torch.Generator().manual_seed(args.seed)
            dmp.module.set_assignment(t.name, torch.randperm(t.assignment_cells, generator=g)[: t.num_embeddings])
    return dmp


def make_batches(args: argparse.Namespace, rank: int) -> List[Dict[str, Any]]:
    rng = np.random.default_rng([args.seed, rank])
    g = torch.Generator().manual_seed(args.seed)  # same permutation on every rank
    perm = torch.randperm(args.num_embeddings, generator=g)
    g.manual_seed(args.seed * 1000 + rank + 1)
    keys = [f"f{t}" for t in range(args.num_tables)]
    out = []
    for _ in range(args.num_batches):
        n_ids = args.batch_size * args.bag_size * len(keys)
        if args.ids == "uniform":
            ids = torch.from_numpy(rng.integers(0, args.num_embeddings, size=n_ids, dtype=np.int64))
        else:
            ranks = ((rng.zipf(args.zipf_a, size=n_ids) - 1) % args.num_embeddings).astype(np.int64)
            ids = perm[torch.from_numpy(ranks)]
        lengths = torch.full((args.batch_size * len(keys),), args.bag_size, dtype=torch.int32)
        weights = torch.rand(n_ids, generator=g) + 0.5
        plain = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=ids, lengths=lengths)
        weighted = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=ids, lengths=lengths, weights=weights)
        proj = torch.randn(args.batch_size, args.dim * len(keys), generator=g)
        out.append({**{v: plain for v in MEMCOM_OPTIONS}, "stock": plain, "stock_weighted": weighted, "proj": proj})
    return out


def make_step(dmp: DistributedModelParallel, variant: str) -> Callable[[Dict[str, Any]], None]:
    def step(batch: Dict[str, Any]) -> None:
        COUNTER.phase = "fwd"
        out = dmp(batch[variant])
        if hasattr(out, "wait"):
            out = out.wait()
        loss = (out.values() * batch["proj"]).sum()
        COUNTER.phase = "bwd"
        loss.backward()
        dmp.fused_optimizer.step()
        COUNTER.phase = "fwd"

    return step


def local_bytes(dmp: DistributedModelParallel) -> Tuple[int, int]:
    """(parameter bytes, optimizer-state bytes) this rank holds."""
    return local_tensor_bytes(dict(dmp.state_dict())), local_tensor_bytes(dmp.fused_optimizer.state_dict()["state"])


# ---------------------------------------------------------------- worker
def worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format=f"%(asctime)s [rank{rank}] %(message)s")
    logging.getLogger("torchrec").setLevel(logging.ERROR)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600)
    )
    try:
        _worker(rank, world, args)
    finally:
        dist.destroy_process_group()


def _worker(rank: int, world: int, args: argparse.Namespace) -> None:
    COUNTER.install()
    batches = make_batches(args, rank)
    models: Dict[str, DistributedModelParallel] = {}
    for v in args.variants:
        t0 = time.perf_counter()
        models[v] = build(args, v)
        log.info("sharded %s in %.1fs", v, time.perf_counter() - t0)
    steps = {v: make_step(m, v) for v, m in models.items()}

    for v, step in steps.items():
        for i in range(args.warmup):
            step(batches[i % len(batches)])
    log.info("warm-up done (%d steps per variant)", args.warmup)

    secs: Dict[str, List[float]] = {v: [] for v in steps}
    order = list(steps)
    k = 0
    for r in range(args.rounds):
        for v in order if r % 2 == 0 else list(reversed(order)):
            dist.barrier()
            t0 = time.perf_counter()
            for i in range(args.steps):
                steps[v](batches[(k + i) % len(batches)])
            t = torch.tensor([(time.perf_counter() - t0) / args.steps], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # slowest rank
            secs[v].append(float(t))
        k += args.steps
        log.info("round %d/%d: %s", r + 1, args.rounds, "  ".join(f"{v} {secs[v][-1] * 1e3:.1f} ms" for v in order))

    # Untimed counting steps.
    comm: Dict[str, Dict[Tuple[str, str, str], List[int]]] = {}
    for v, step in steps.items():
        COUNTER.records.clear()
        COUNTER.enabled = True
        for i in range(args.count_steps):
            step(batches[i % len(batches)])
        COUNTER.enabled = False
        comm[v] = {key: [x / args.count_steps for x in rec] for key, rec in COUNTER.records.items()}

    mem = {v: local_bytes(m) for v, m in models.items()}
    gathered: List[Any] = [None] * world
    dist.all_gather_object(gathered, {"comm": comm, "mem": mem})
    if rank == 0:
        report(args, world, secs, gathered)


def report(args: argparse.Namespace, world: int, secs: Dict[str, List[float]], per_rank: List[Dict[str, Any]]) -> None:
    variants = list(secs)
    med = {v: statistics.median(secs[v]) for v in variants}
    print()
    print(
        f"world={world} gloo, sharding={args.sharding}, {args.num_tables} table(s) of n={args.num_embeddings:,} d={args.dim}"
        f" (memcom ratio {args.ratio}), per-rank batch {args.batch_size} x {args.bag_size} ids per feature, ids={args.ids},"
        f" opt={args.optimizer}, threads/rank={args.threads}, validate={'off' if args.no_validate else 'on'},"
        f" rounds={args.rounds} x {args.steps} steps"
    )
    hdr = f"{'variant':<15} {'ms/step':>9} {'min..max ms':>17} {'samples/s/rank':>15} {'vs stock':>9} {'vs stock_w':>10}"
    print(hdr)
    print("-" * len(hdr))
    for v in variants:
        s = med[v]
        r1 = f"{s / med['stock']:.2f}x" if "stock" in med else "-"
        r2 = f"{s / med['stock_weighted']:.2f}x" if "stock_weighted" in med else "-"
        print(
            f"{v:<15} {s * 1e3:9.1f} {min(secs[v]) * 1e3:8.1f}..{max(secs[v]) * 1e3:<8.1f} {args.batch_size / s:15,.0f} {r1:>9} {r2:>10}"
        )
    print("(ms/step: median over rounds of the slowest rank's mean; 'vs' columns are step-time ratios, lower is better)")
    if "memcom" in med:
        for base in ("stock", "stock_weighted"):
            if base in med:
                pr = [m / b for m, b in zip(secs["memcom"], secs[base])]
                print(f"memcom / {base} step time per round: {', '.join(f'{x:.2f}' for x in pr)} (median {statistics.median(pr):.2f}x)")

    # Communication: rank 0's per-step bytes by site, and all-rank totals.
    keys = sorted({key for r in per_rank for v in variants for key in r["comm"][v]}, key=lambda k: (k[0] != "fwd", k[1], k[2]))
    print()
    print("Collective bytes per step, rank 0 (input-tensor bytes; off-rank in brackets), fwd / bwd by call site:")
    hdr = f"{'phase':<5} {'site':<26} {'op':<18} " + " ".join(f"{v:>25}" for v in variants)
    print(hdr)
    print("-" * len(hdr))

    def fmt(rec: Any) -> str:
        if not rec:
            return "-"
        return f"{rec[1]:,.0f} ({rec[2]:,.0f})"

    for key in keys:
        row = [per_rank[0]["comm"][v].get(key) for v in variants]
        print(f"{key[0]:<5} {key[1]:<26} {key[2]:<18} " + " ".join(f"{fmt(r):>25}" for r in row))
    print("-" * len(hdr))
    for phase in ("fwd", "bwd"):
        tot = []
        for v in variants:
            recs = [rec for key, rec in per_rank[0]["comm"][v].items() if key[0] == phase]
            tot.append([0, sum(r[1] for r in recs), sum(r[2] for r in recs)])
        print(f"{phase:<5} {'total rank 0':<26} {'':<18} " + " ".join(f"{fmt(t):>25}" for t in tot))
    all_off = []
    for v in variants:
        all_off.append(sum(rec[2] for r in per_rank for rec in r["comm"][v].values()))
    print(f"{'all':<5} {'off-rank, all ranks':<26} {'':<18} " + " ".join(f"{x:>25,.0f}" for x in all_off))
    if "memcom" in variants:
        for base in ("stock", "stock_weighted"):
            if base in variants and all_off[variants.index(base)]:
                print(f"memcom / {base} off-rank bytes: {all_off[variants.index('memcom')] / all_off[variants.index(base)]:.3f}x")

    print()
    print("Embedding memory per rank (measured: local shards in state_dict / fused_optimizer state), MiB:")
    hdr = f"{'variant':<15} " + " ".join(f"{'rank' + str(r) + ' param':>12} {'rank' + str(r) + ' state':>12}" for r in range(world))
    hdr += f" {'model total':>12}"
    print(hdr)
    print("-" * len(hdr))
    opt = OPTIMIZERS[args.optimizer]
    for v in variants:
        cells = " ".join(f"{r['mem'][v][0] / 2**20:12.1f} {r['mem'][v][1] / 2**20:12.2f}" for r in per_rank)
        model = sum(
            (tm.param_bytes + tm.optimizer_state_bytes) for tm in (table_memory(t, opt) for t in table_configs(args, v))
        )
        print(f"{v:<15} {cells} {model / 2**20:12.1f}")
    print("(model total: memcom_torchrec.table_memory, params + optimizer state, all tables)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--sharding", choices=["table_wise", "row_wise"], default="table_wise")
    p.add_argument("--num-tables", type=int, default=None, help="default: world size for table_wise, 1 for row_wise")
    p.add_argument("--num-embeddings", type=int, default=2_000_000, help="entities n per table")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--ratio", type=float, default=16.0, help="MEmCom compression ratio")
    p.add_argument("--batch-size", type=int, default=2048, help="per rank")
    p.add_argument("--bag-size", type=int, default=20, help="ids per bag per feature")
    p.add_argument("--ids", choices=["zipf", "uniform"], default="zipf")
    p.add_argument("--zipf-a", type=float, default=1.1)
    p.add_argument("--num-batches", type=int, default=4)
    p.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="rowwise_adagrad")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant per round")
    p.add_argument("--count-steps", type=int, default=2, help="untimed steps with collective counting")
    p.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--no-validate", action="store_true", help="MEmCom sharder validate_inputs=False (no per-step all_reduce)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.num_tables is None:
        args.num_tables = args.world_size if args.sharding == "table_wise" else 1
    mp.spawn(worker, args=(args.world_size, free_port(), args), nprocs=args.world_size, join=True)


if __name__ == "__main__":
    main()
