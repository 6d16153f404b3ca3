"""Runs a test body in several gloo processes (CPU), like TorchRec's MultiProcessTestBase."""

import datetime
import os
import socket
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable[..., Any], kwargs: dict) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        fn(rank=rank, world_size=world_size, **kwargs)
    finally:
        dist.destroy_process_group()


def run_multiprocess(fn: Callable[..., Any], world_size: int = 2, **kwargs: Any) -> None:
    """Runs ``fn(rank=, world_size=, **kwargs)`` on ``world_size`` gloo ranks; re-raises failures."""
    mp.spawn(_worker, args=(world_size, free_port(), fn, kwargs), nprocs=world_size, join=True)
