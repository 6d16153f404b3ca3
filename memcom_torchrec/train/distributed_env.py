"""Process-group set-up shared by every entry point (torchrun, torchx, single process)."""

import datetime
import logging
import os
import socket
from typing import Tuple

import torch
import torch.distributed as dist

logger: logging.Logger = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: str = "auto", timeout_s: int = 600) -> Tuple[int, int, torch.device]:
    """Initialises ``torch.distributed`` from torchrun/torchx env vars, or a world of one.

    Args:
        device (str): ``auto`` (CUDA if available), ``cpu`` or ``cuda``.
        timeout_s (int): collective timeout.

    Returns:
        Tuple[int, int, torch.device]: rank, world size, compute device. NCCL
        with CUDA, gloo on CPU.
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    if use_cuda:  # before the NCCL group is created, so it binds this process's GPU
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % max(1, torch.cuda.device_count()))
    if not dist.is_initialized():
        if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
            init = "env://"
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        else:
            init, rank, world = f"tcp://127.0.0.1:{_free_port()}", 0, 1
        dist.init_process_group(
            "nccl" if use_cuda else "gloo",
            init_method=init,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count())))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    return rank, world, dev
