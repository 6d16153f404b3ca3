"""Training throughput of one MEmCom table against the uncompressed table.

One process, DistributedModelParallel over a gloo world of one. Each variant runs
forward + backward + fused optimizer update on the same pre-generated batches:

  memcom      MEmComEmbeddingBagConfig (n, d, compression ratio) in a
              MEmComEmbeddingBagCollection, MEmComEmbeddingBagCollectionSharder
              (lookup_path "auto": on CPU the gathered w gradient), w's gradient and
              update by the compiled op (memcom::entity_weight_step_) where it is built
  memcom_aten the same with w's step on the ATen fallback (per-sample-weight gradient
              of embedding_bag, then a sort-coalesced update)
  memcom_tbe  the same with lookup_path="weighted_tbe": w's gradient from
              FBGEMM's per-sample-weight kernel (the CUDA default)
  plain       a plain EmbeddingBagConfig (n x d) in a MEmComEmbeddingBagCollection,
              same sharder (it goes through the same weighted fused TBE, weights = 1)
  stock       TorchRec's EmbeddingBagCollection (n x d, unweighted) with the stock
              EmbeddingBagCollectionSharder: the true uncompressed baseline

All tables are planned table-wise (ParameterConstraints(sharding_types=["table_wise"]))
with the same fused params (EXACT_ROWWISE_ADAGRAD, lr 0.01 by default). Variants are
interleaved (round r runs memcom, plain, stock, each for --steps steps) so the noise of
the machine hits all of them alike; the table reports the median over rounds.

    .venv/bin/python benchmarks/bench_memcom.py                      # defaults: n=2M, d=64, ratio 16
    .venv/bin/python benchmarks/bench_memcom.py --ids uniform --rounds 8
    .venv/bin/python benchmarks/bench_memcom.py --profile            # top ops of the MEmCom step
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
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
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
from memcom_torchrec.distributed.memcom_embeddingbag import WEIGHTED_TBE  # noqa: E402
from memcom_torchrec.optim import fused_step  # noqa: E402
from memcom_torchrec.train.rank_stats import local_tensor_bytes  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    def tqdm(it, **_kw):  # type: ignore
        return it

log = logging.getLogger("bench_memcom")
VARIANTS = ["memcom", "memcom_aten", "memcom_tbe", "plain", "stock"]
FEATURE = "f"
OPTIMIZERS = {
    "sgd": EmbOptimType.EXACT_SGD,
    "adagrad": EmbOptimType.EXACT_ADAGRAD,
    "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_ids(args: argparse.Namespace, count: int, rng: np.random.Generator, perm: torch.Tensor) -> torch.Tensor:
    """``count`` ids in [0, n): uniform, or Zipf(a) ranks scattered over the id space by ``perm``."""
    if args.ids == "uniform":
        return torch.from_numpy(rng.integers(0, args.num_embeddings, size=count, dtype=np.int64))
    ranks = (rng.zipf(args.zipf_a, size=count) - 1) % args.num_embeddings
    return perm[torch.from_numpy(ranks.astype(np.int64))]


def make_batches(args: argparse.Namespace) -> List[Tuple[KeyedJaggedTensor, torch.Tensor]]:
    rng = np.random.default_rng(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    perm = torch.randperm(args.num_embeddings, generator=g)
    out = []
    for _ in range(args.num_batches):
        lengths = torch.full((args.batch_size,), args.bag_size, dtype=torch.int32)
        ids = make_ids(args, args.batch_size * args.bag_size, rng, perm)
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=[FEATURE], values=ids, lengths=lengths)
        proj = torch.randn(args.batch_size, args.dim, generator=g)
        out.append((kjt, proj))
    return out


def plan_and_shard(model: torch.nn.Module, sharder: Any, table: str) -> DistributedModelParallel:
    constraints = {table: ParameterConstraints(sharding_types=["table_wise"])}
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=1, compute_device="cpu"), constraints=constraints)
    plan = planner.collective_plan(model, [sharder], dist.group.WORLD)
    return DistributedModelParallel(
        model, env=ShardingEnv.from_process_group(dist.group.WORLD), device=torch.device("cpu"), plan=plan, sharders=[sharder]
    )


def build_variants(args: argparse.Namespace) -> Tuple[Dict[str, DistributedModelParallel], Dict[str, EmbeddingBagConfig]]:
    fused = {"optimizer": OPTIMIZERS[args.optimizer], "learning_rate": args.lr}
    n, d = args.num_embeddings, args.dim
    meta = torch.device("meta")
    configs: Dict[str, EmbeddingBagConfig] = {
        "memcom": MEmComEmbeddingBagConfig(
            name="t", num_embeddings=n, embedding_dim=d, feature_names=[FEATURE], compression_ratio=args.ratio
        ),
        "memcom_aten": MEmComEmbeddingBagConfig(
            name="t", num_embeddings=n, embedding_dim=d, feature_names=[FEATURE], compression_ratio=args.ratio
        ),
        "memcom_tbe": MEmComEmbeddingBagConfig(
            name="t", num_embeddings=n, embedding_dim=d, feature_names=[FEATURE], compression_ratio=args.ratio
        ),
        "plain": EmbeddingBagConfig(name="t", num_embeddings=n, embedding_dim=d, feature_names=[FEATURE]),
        "stock": EmbeddingBagConfig(name="t", num_embeddings=n, embedding_dim=d, feature_names=[FEATURE]),
    }
    models: Dict[str, DistributedModelParallel] = {}
    for name in args.variants:
        t0 = time.perf_counter()
        if name == "stock":
            model = EmbeddingBagCollection(tables=[configs[name]], device=meta)
            sharder: Any = EmbeddingBagCollectionSharder(fused_params=fused)
        else:
            model = MEmComEmbeddingBagCollection([configs[name]], device=meta)
            path = WEIGHTED_TBE if name == "memcom_tbe" else "auto"  # auto: the gathered path on CPU
            sharder = MEmComEmbeddingBagCollectionSharder(fused_params=fused, lookup_path=path)
        models[name] = plan_and_shard(model, sharder, "t")
        log.info("sharded %-6s in %.1fs", name, time.perf_counter() - t0)
    return models, configs


def make_step(dmp: DistributedModelParallel, kernel: Optional[str] = None) -> Callable[[KeyedJaggedTensor, torch.Tensor], None]:
    """One training step; ``kernel`` chooses w's step implementation for this variant's steps only."""

    def step(kjt: KeyedJaggedTensor, proj: torch.Tensor) -> None:
        fused_step.set_kernel(kernel)
        out = dmp(kjt)
        if hasattr(out, "wait"):
            out = out.wait()
        loss = (out.values() * proj).sum()
        loss.backward()
        dmp.fused_optimizer.step()
        fused_step.set_kernel(None)

    return step


def measured_bytes(dmp: DistributedModelParallel) -> Tuple[int, int]:
    """(parameter bytes, optimizer-state bytes) actually held by this rank."""
    return local_tensor_bytes(dict(dmp.state_dict())), local_tensor_bytes(dmp.fused_optimizer.state_dict()["state"])


def run_rounds(args, models, batches) -> Dict[str, List[float]]:
    steps = {name: make_step(m, fused_step.ATEN if name == "memcom_aten" else None) for name, m in models.items()}
    log.info("warm-up: %d steps per variant", args.warmup)
    for name, step in steps.items():
        for i in range(args.warmup):
            step(*batches[i % len(batches)])
    secs: Dict[str, List[float]] = {name: [] for name in steps}
    order = list(steps)
    k = 0
    for r in tqdm(range(args.rounds), desc="rounds", file=sys.stdout):
        # ABAB...: alternate the order each round as well.
        for name in order if r % 2 == 0 else reversed(order):
            step = steps[name]
            t0 = time.perf_counter()
            for i in range(args.steps):
                step(*batches[(k + i) % len(batches)])
            secs[name].append((time.perf_counter() - t0) / args.steps)
        k += args.steps
    return secs


def profile_memcom(args, dmp, batches, name: str = "memcom") -> None:
    from torch.profiler import ProfilerActivity, profile, record_function

    step = make_step(dmp, fused_step.ATEN if name == "memcom_aten" else None)
    for i in range(2):
        step(*batches[i % len(batches)])
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for i in range(args.profile_steps):
            kjt, proj = batches[i % len(batches)]
            with record_function("bench:forward"):
                out = dmp(kjt)
                if hasattr(out, "wait"):
                    out = out.wait()
                loss = (out.values() * proj).sum()
            with record_function("bench:backward+update"):
                loss.backward()
                dmp.fused_optimizer.step()
    ka = prof.key_averages()
    print(f"\n=== torch.profiler, {name} step x {args.profile_steps}: top ops by self CPU time ===")
    print(ka.table(sort_by="self_cpu_time_total", row_limit=args.profile_rows))
    if os.environ.get("BENCH_SHAPES"):
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=25))
    print(f"\n=== torch.profiler, {name} step x {args.profile_steps}: top ops by total CPU time (incl. children) ===")
    print(ka.table(sort_by="cpu_time_total", row_limit=args.profile_rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-embeddings", type=int, default=2_000_000, help="entities n")
    p.add_argument("--dim", type=int, default=64, help="embedding dim d")
    p.add_argument("--ratio", type=float, default=16.0, help="MEmCom compression ratio n*d/(m*d+n)")
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--bag-size", type=int, default=20, help="ids per bag")
    p.add_argument("--ids", choices=["zipf", "uniform"], default="zipf")
    p.add_argument("--zipf-a", type=float, default=1.1, help="Zipf exponent (ids = permuted Zipf ranks)")
    p.add_argument("--num-batches", type=int, default=8, help="pre-generated batches, reused cyclically")
    p.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="rowwise_adagrad")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--warmup", type=int, default=5, help="warm-up steps per variant")
    p.add_argument("--rounds", type=int, default=8, help="interleaved rounds")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant per round")
    p.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    p.add_argument(
        "--threads", type=int, default=1,
        help="torch.set_num_threads (0: leave default); 1 by default: with 2 threads on a shared 2-core machine, "
        "OpenMP barriers stall whenever another process runs",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="also print torch.profiler top ops of the MEmCom step")
    p.add_argument("--profile-variants", nargs="+", default=["memcom"], choices=VARIANTS)
    p.add_argument("--profile-steps", type=int, default=10)
    p.add_argument("--profile-rows", type=int, default=30)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("torchrec").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1, timeout=datetime.timedelta(seconds=600)
    )
    try:
        t0 = time.perf_counter()
        batches = make_batches(args)
        ids = torch.cat([b[0].values() for b in batches])
        log.info(
            "%d batches of %d x %d ids (%s) in %.1fs; distinct ids per batch ~%d",
            len(batches), args.batch_size, args.bag_size, args.ids, time.perf_counter() - t0,
            int(torch.unique(batches[0][0].values()).numel()),
        )
        del ids
        models, configs = build_variants(args)
        secs = run_rounds(args, models, batches)

        ids_per_step = args.batch_size * args.bag_size
        med = {name: statistics.median(v) for name, v in secs.items()}
        base = "stock" if "stock" in med else None
        print()
        print(
            f"n={args.num_embeddings:,} d={args.dim} batch={args.batch_size}x{args.bag_size} ids={args.ids}"
            + (f"(a={args.zipf_a})" if args.ids == "zipf" else "")
            + f" opt={args.optimizer} lr={args.lr} threads={torch.get_num_threads()}"
            f" rounds={args.rounds} x {args.steps} steps (median over rounds)"
        )
        hdr = f"{'variant':<10} {'ms/step':>9} {'min..max ms':>15} {'samples/s':>11} {'ids/s':>12} {'vs stock':>9}"
        print(hdr)
        print("-" * len(hdr))
        for name in secs:
            s = med[name]
            ratio = f"{med[base] / s:.2f}x" if base else "-"
            print(
                f"{name:<10} {s * 1e3:9.1f} {min(secs[name]) * 1e3:7.1f}..{max(secs[name]) * 1e3:<7.1f} "
                f"{args.batch_size / s:11,.0f} {ids_per_step / s:12,.0f} {ratio:>9}"
            )
        if "memcom" in secs and base:
            per_round = [b / m for m, b in zip(secs["memcom"], secs[base])]
            print(
                f"MEmCom / uncompressed-stock throughput: median {statistics.median(per_round):.2f}x, "
                f"best-round ms ratio {min(secs[base]) / min(secs['memcom']):.2f}x "
                f"(per round: {', '.join(f'{x:.2f}' for x in per_round)})"
            )
        if "memcom" in secs and "plain" in secs:
            per_round = [b / m for m, b in zip(secs["memcom"], secs["plain"])]
            print(f"MEmCom / uncompressed-plain (same sharder) throughput: median {statistics.median(per_round):.2f}x")

        print()
        opt = OPTIMIZERS[args.optimizer]
        hdr = (
            f"{'variant':<10} {'rows':>10} {'param MB':>9} {'opt-state MB':>13} {'ratio':>7} "
            f"{'meas. param MB':>15} {'meas. state MB':>15}"
        )
        print(hdr)
        print("-" * len(hdr))
        for name in secs:
            tm = table_memory(configs[name], opt)
            mp, ms = measured_bytes(models[name])
            print(
                f"{name:<10} {tm.num_rows:>10,} {tm.param_bytes / 2**20:9.1f} {tm.optimizer_state_bytes / 2**20:13.2f} "
                f"{tm.compression_ratio:7.2f} {mp / 2**20:15.1f} {ms / 2**20:15.2f}"
            )
        print("(param/opt-state/ratio: memcom_torchrec.table_memory; meas.: local tensors in state_dict / fused_optimizer)")

        if args.profile:
            for name in args.profile_variants:
                if name in models:
                    profile_memcom(args, models[name], batches, name)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
