"""Process-group set-up shared by every entry point (torchrun, torchx, single process)."""

import datetime
import logging
import os
import sys
from typing import Tuple

import torch
import torch.distributed as dist

logger: logging.Logger = logging.getLogger(__name__)


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
        backend, timeout = "nccl" if use_cuda else "gloo", datetime.timedelta(seconds=timeout_s)
        if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, timeout=timeout)
        else:  # a world of one: an in-memory store, no port to pick
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count())))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    return rank, world, dev


def shutdown_distributed() -> None:
    """Tears the process group down once every rank has arrived.

    Without the barrier, a rank that finishes first destroys its gloo/NCCL
    context while a peer is still in its last collective.
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def end_process(code: int = 0) -> None:
    """Flushes logs and output, then ends the process without interpreter finalization.

    ``destroy_process_group`` drops only the registry's reference: the sharded
    modules, their ShardingEnv and TorchRec's awaitables keep the Gloo process
    group (and its worker threads, holding work objects with tensors) alive
    until the interpreter finalizes, and destroying them then can abort the
    process (``terminate called without an active exception``, SIGABRT) after
    the run has succeeded (seen in the 2-process tests; pytorch/pytorch#179291
    describes the mechanism). A finished run has nothing left to finalize.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
