"""What one training process measured about itself: throughput, peak memory, embedding bytes.

Each rank fills ``rank_stats`` at the end of a run; the trainer gathers them
into ``RunResult.rank_stats`` (``metrics.json``) and logs them, and
``benchmarks/bench_scale.py`` tabulates them.
"""

import resource
from typing import Any, Dict

import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed import DistributedModelParallel


def reset_peak_rss() -> None:
    """Starts a new peak-RSS window (Linux: ``/proc/self/clear_refs``; elsewhere peaks only grow)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """Peak resident memory of this process since the last ``reset_peak_rss``, MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def local_tensor_bytes(x: Any) -> int:
    """Bytes this rank holds of a tensor, a ``ShardedTensor`` (its local shards), or a dict / list of them."""
    if isinstance(x, ShardedTensor):
        return sum(s.tensor.numel() * s.tensor.element_size() for s in x.local_shards())
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size() if x.dim() > 0 else 0
    if isinstance(x, dict):
        return sum(local_tensor_bytes(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return sum(local_tensor_bytes(v) for v in x)
    return 0


def rank_stats(
    model: DistributedModelParallel, rows: int, seconds: float, train_peak_rss_mb: float, peak_rss: float
) -> Dict[str, float]:
    """What this rank held and did: training rows/s, peak RSS, local embedding bytes.

    Args:
        model (DistributedModelParallel): the sharded model.
        rows (int): training rows (interactions) this rank stepped through.
        seconds (float): training time (the training loops only).
        train_peak_rss_mb (float): peak RSS of the training loops (``peak_rss_mb``).
        peak_rss (float): peak RSS of the run, evaluation included.

    Returns:
        Dict[str, float]: ``train_rows_per_second``, ``train_seconds``,
        ``train_peak_rss_mb``, ``peak_rss_mb`` (evaluation included),
        ``embedding_param_bytes`` (local shards of every fused table, ``w``
        included) and ``embedding_optimizer_bytes`` (their fused optimizer state).
    """

    fused = model.fused_optimizer
    params = sum(local_tensor_bytes(p) for p in fused.params.values())
    return {
        "train_rows_per_second": rows / seconds if seconds > 0 else 0.0,
        "train_seconds": seconds,
        "train_peak_rss_mb": train_peak_rss_mb,
        "peak_rss_mb": peak_rss,
        "embedding_param_bytes": float(params),
        "embedding_optimizer_bytes": float(local_tensor_bytes(dict(fused.state))),
    }
