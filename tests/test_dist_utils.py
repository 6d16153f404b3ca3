"""The multi-process harness reports every rank's failure: exceptions, fatal signals and hangs."""

import os
import re
import signal
import time

import pytest
import torch
import torch.distributed as dist

from dist_utils import MultiProcessFailure, run_multiprocess

pytestmark = pytest.mark.slow


def _sum_body(rank: int, world_size: int) -> None:
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    assert float(t) == world_size * (world_size + 1) / 2
    print(f"rank {rank} done")


def _raise_on_rank1_body(rank: int, world_size: int) -> None:
    print(f"rank {rank} about to check")
    if rank == 1:
        raise ValueError("planted failure on rank 1")
    dist.barrier()  # rank 0 waits for a peer that never comes


def _abort_body(rank: int, world_size: int) -> None:
    if rank == 0:
        print("rank 0 aborting")
        os.kill(os.getpid(), signal.SIGABRT)


def _hang_body(rank: int, world_size: int) -> None:
    time.sleep(3600)


def test_passing_body_and_consecutive_groups() -> None:
    for _ in range(2):  # a fresh store per run: no port to race for, nothing left behind
        run_multiprocess(_sum_body, world_size=3)


def test_exception_is_reported_with_its_traceback_and_the_peer_is_not_lost() -> None:
    with pytest.raises(MultiProcessFailure) as info:
        run_multiprocess(_raise_on_rank1_body, world_size=2)
    text = str(info.value)
    assert "rank 1: exited with code 1" in text and "ValueError: planted failure on rank 1" in text
    assert "rank 1 about to check" in text  # the tail of its log
    # rank 0 is reported too: gloo's error when its peer vanished, or killed after the grace period
    assert re.search(r"rank 0: (exited with code 1|still running \d+ s after a peer failed)", text), text


def test_fatal_signal_is_named_with_the_log_tail() -> None:
    with pytest.raises(MultiProcessFailure) as info:
        run_multiprocess(_abort_body, world_size=2)
    text = str(info.value)
    assert "rank 0: died on signal SIGABRT" in text, text
    assert "rank 0 aborting" in text and "Fatal Python error: Aborted" in text  # faulthandler's stack


def test_hang_is_killed_at_the_deadline() -> None:
    with pytest.raises(MultiProcessFailure, match=r"rank 0: still running after the 5 s deadline \(killed\)"):
        run_multiprocess(_hang_body, world_size=2, timeout_s=5)
