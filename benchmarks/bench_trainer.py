"""The real trainer's step against a plain-PyTorch model of the same shape, on the same batches.

Model: the phone-shaped next-item classifier of the phone recipe (no user id, history mean-pooled,
MLP ``--hidden``, tied logits ``<q, e_i> + b_i``, full softmax, dropout 0.25), one process.

Variants, interleaved in rounds of ``--steps`` steps each (the same batches for all):

  trainer     the real training step: ``make_pipeline(...).progress`` over the trainer's own
              DataLoader (Parquet on disk -> KJT batches -> TorchRec pipeline -> FBGEMM fused
              TBE update + Adam), in a 1-process gloo group, as ``python -m memcom_torchrec.train``
  trainer_mem the same step over batches already in memory (the pipeline without the reader), on a
              second copy of the model: each pipeline drives a model of its own
  reader      the DataLoader alone (Parquet -> padded KJT batches); by default in the steady state of
              epochs after the first (row groups decoded once, from the process's cache; ``--cold``: the first)
  plain       plain PyTorch: an ``n x d`` (or MEmCom ``U``, ``w``) table as parameters, the same MLP,
              head and bias, dense gradients, row-wise Adagrad for the table (``scripts/reference_sweep.py``'s
              ``RowwiseAdagrad``) and Adam for the rest, on the same batches as padded tensors

Step time is the median over rounds of each variant's mean step time; the ratios are what the
README's benchmark section records (bar in issue 23: trainer / plain <= 1.2).

    .venv/bin/python benchmarks/bench_trainer.py --data-dir data/ml-1m --method uncompressed
    .venv/bin/python benchmarks/bench_trainer.py --data-dir data/ml-1m --method memcom --compression-ratio 16
    .venv/bin/python benchmarks/bench_trainer.py --data-dir data/ml-1m --profile 20   # where the step's time goes
"""

import argparse
import itertools
import math
import os
import socket
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
from reference_sweep import RowwiseAdagrad  # noqa: E402

from memcom_torchrec.data.reader import make_dataloader, pad_batch  # noqa: E402
from memcom_torchrec.data.manifest import read_manifest  # noqa: E402
from memcom_torchrec.models.builder import build_model  # noqa: E402
from memcom_torchrec.train.config import TrainConfig  # noqa: E402
from memcom_torchrec.train.trainer import build_optimizer, make_pipeline, shard_model  # noqa: E402


class PlainPhoneModel(nn.Module):
    """The phone model in plain PyTorch: mean-pooled history -> MLP -> head -> tied logits + bias.

    Args:
        n (int): items.
        d (int): embedding width.
        hidden (List[int]): MLP widths.
        dropout (float): after each hidden layer.
        buckets (int): 0 for a plain ``n x d`` table, else MEmCom's ``m`` (``w[i] U[i mod m]``).
    """

    def __init__(self, n: int, d: int, hidden: List[int], dropout: float, buckets: int = 0) -> None:
        super().__init__()
        bound = math.sqrt(1.0 / n)
        self.n, self.buckets = n, buckets
        self.table = nn.Parameter(torch.empty(buckets or n, d).uniform_(-bound, bound))
        self.w = nn.Parameter(torch.ones(n)) if buckets else None
        layers: List[nn.Module] = []
        width = d
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        self.mlp = nn.Sequential(*layers)
        self.head = nn.Linear(width, d)
        self.item_bias = nn.Parameter(torch.zeros(n))

    def items(self) -> torch.Tensor:
        if not self.buckets:
            return self.table
        ids = torch.arange(self.n)
        return self.w.unsqueeze(1) * self.table[ids % self.buckets]

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        items = self.items()
        mask = history >= 0
        v = items[history.clamp(min=0)] * mask.unsqueeze(-1)
        pooled = v.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return self.head(self.mlp(pooled)) @ items.t() + self.item_bias


def padded_history(batch, history_len: int) -> torch.Tensor:  # pyre-ignore[2]
    """``B x history_len`` ids (``-1`` padding) of a batch's ``history`` feature."""
    hist = batch.sparse_features.to_dict()["history"]
    lengths = hist.lengths()
    out = torch.full((lengths.numel(), history_len), -1, dtype=torch.long)
    rows = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    cols = torch.arange(hist.values().numel()) - starts[rows]
    out[rows, cols] = hist.values().long()
    return out


def timed(step: Callable[[], None], steps: int) -> float:
    """Mean seconds per call of ``step`` over ``steps`` calls."""
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="data/ml-1m")
    p.add_argument("--method", default="uncompressed", choices=["uncompressed", "memcom"])
    p.add_argument("--compression-ratio", type=float, default=16.0)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--history-len", type=int, default=5)
    p.add_argument("--hidden", type=int, nargs="+", default=[256])
    p.add_argument("--steps", type=int, default=20, help="steps per variant per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="also profile STEPS steps of each --profile-variants and print the top operators by self CPU time")
    p.add_argument("--cold", action="store_true",
                   help="time the reader's first epoch (every row group decoded from Parquet) instead of a later one")
    p.add_argument("--profile-variants", nargs="+", default=["trainer_mem"], choices=["trainer", "trainer_mem", "plain"])
    p.add_argument("--profile-shapes", action="store_true", help="group the profile by input shapes")
    args = p.parse_args()
    torch.set_num_threads(1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    manifest = read_manifest(args.data_dir)
    n_items, n_users = int(manifest["num_items"]), int(manifest["num_users"])
    cfg = TrainConfig(
        data_dir=args.data_dir, method=args.method,
        compression_ratio=args.compression_ratio if args.method != "uncompressed" else 1.0,
        model="next_item", scorer="tied", use_user_id=False, history_len=args.history_len,
        batch_size=args.batch_size, hidden=args.hidden, dropout=0.25, embedding_lr=0.1,
    )
    device = torch.device("cpu")

    def trainer_pipeline():  # its own model and optimizer: a TorchRec pipeline rewrites the model it drives
        model, tables = build_model(cfg, n_users, n_items, torch.device("meta"))
        model = shard_model(cfg, model, tables, 1, device)
        optimizer, _ = build_optimizer(cfg, model)
        return make_pipeline(cfg, model, optimizer, device), tables

    pipeline, tables = trainer_pipeline()
    pipeline_mem, _ = trainer_pipeline()

    def loader_iter():  # the trainer's batches, epoch after epoch
        for epoch in itertools.count():
            loader = make_dataloader(cfg.data_dir, "train", cfg.batch_size, 0, 1, shuffle=True, seed=0, epoch=epoch,
                                     history_len=cfg.history_len, num_workers=cfg.num_workers, with_user=False)
            for b in loader:
                yield pad_batch(b, cfg.batch_size)

    if not args.cold:  # steady state: every epoch after the first reads its row groups from the process's cache
        for _ in make_dataloader(cfg.data_dir, "train", cfg.batch_size, 0, 1, shuffle=True, seed=0, epoch=0,
                                 history_len=cfg.history_len, num_workers=0, with_user=False):
            pass
    from_disk = loader_iter()
    total = args.steps * args.rounds
    batches = [next(from_disk) for _ in range(total)]
    histories = [padded_history(b, args.history_len) for b in batches]
    labels = [b.labels.long() for b in batches]
    in_memory = itertools.cycle(batches)

    buckets = tables[0].num_buckets if args.method == "memcom" else 0
    plain = PlainPhoneModel(n_items, cfg.embedding_dim, args.hidden, 0.25, buckets)
    sparse = [plain.table] + ([plain.w] if plain.w is not None else [])
    opt_sparse = RowwiseAdagrad(sparse, lr=cfg.embedding_lr)
    dense = [p for name, p in plain.named_parameters() if name not in ("table", "w")]
    opt_dense = torch.optim.Adam(dense, lr=cfg.dense_lr)
    plain_i = itertools.cycle(range(total))

    def plain_step() -> None:
        i = next(plain_i)
        loss = nn.functional.cross_entropy(plain(histories[i]), labels[i], ignore_index=-1)
        opt_sparse.zero_grad()
        opt_dense.zero_grad()
        loss.backward()
        opt_sparse.step()
        opt_dense.step()

    variants: Dict[str, Callable[[], None]] = {
        "trainer": lambda: pipeline.progress(from_disk),
        "trainer_mem": lambda: pipeline_mem.progress(in_memory),
        "reader": lambda: next(from_disk),
        "plain": plain_step,
    }
    for step in variants.values():  # warm-up
        timed(step, 2)
    times: Dict[str, List[float]] = {k: [] for k in variants}
    for r in range(args.rounds):
        for name, step in variants.items():
            times[name].append(timed(step, args.steps))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1] * 1e3:.1f} ms" for k, v in times.items()),
              flush=True)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"\n{args.method}{'' if args.method == 'uncompressed' else f' {args.compression_ratio:g}x'}, "
          f"batch {args.batch_size}, history {args.history_len}, hidden {args.hidden}, 1 thread, "
          f"{args.rounds} rounds x {args.steps} steps (median of round means)")
    print("| variant | ms / step | / plain |")
    print("|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.1f} | {v / med['plain']:.2f}x |")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name in args.profile_variants:
            with profile(activities=[ProfilerActivity.CPU], record_shapes=args.profile_shapes) as prof:
                timed(variants[name], args.profile)
            print(f"\n{name}, {args.profile} steps: top operators by self CPU time")
            print(prof.key_averages(group_by_input_shape=args.profile_shapes).table(
                sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=40, max_shapes_column_width=60))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
