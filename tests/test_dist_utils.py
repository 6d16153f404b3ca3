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


def _pid_body(rank: int, world_size: int, out: str, set_env: bool = False) -> None:
    """Writes this rank's pid and whether it sees a variable an earlier body set; sets it if asked."""
    with open(os.path.join(out, f"rank{rank}"), "w") as f:
        f.write(f"{os.getpid()} {os.environ.get('MEMCOM_TEST_LEFTOVER', '-')}")
    if set_env:
        os.environ["MEMCOM_TEST_LEFTOVER"] = "set"


def _pids(out: str, world_size: int):
    return [open(os.path.join(out, f"rank{r}")).read().split() for r in range(world_size)]


def test_passing_body_and_consecutive_groups() -> None:
    for _ in range(2):
        run_multiprocess(_sum_body, world_size=3)
    run_multiprocess(_sum_body, world_size=3, fresh=True)  # a world of its own, shut down after the body


def test_world_is_kept_between_bodies_and_replaced_after_a_failure(tmp_path) -> None:
    run_multiprocess(_pid_body, world_size=2, out=str(tmp_path), set_env=True)
    first = _pids(str(tmp_path), 2)
    run_multiprocess(_pid_body, world_size=2, out=str(tmp_path))
    second = _pids(str(tmp_path), 2)
    assert [p for p, _ in second] == [p for p, _ in first]  # the same processes...
    assert [e for _, e in second] == ["-", "-"]  # ...but a body's environment variables do not leak
    with pytest.raises(MultiProcessFailure, match="planted failure on rank 1"):
        run_multiprocess(_raise_on_rank1_body, world_size=2)
    run_multiprocess(_pid_body, world_size=2, out=str(tmp_path))
    third = _pids(str(tmp_path), 2)
    assert not {p for p, _ in third} & {p for p, _ in first}, (first, third)  # a fresh world after the failure


def test_exception_is_reported_with_its_traceback_and_the_peer_is_not_lost() -> None:
    with pytest.raises(MultiProcessFailure, match="ranks failed running _raise_on_rank1_body") as info:
        run_multiprocess(_raise_on_rank1_body, world_size=2)
    text = str(info.value)
    assert "rank 1: exited with code 1" in text and "ValueError: planted failure on rank 1" in text
    assert "rank 1 about to check" in text  # the tail of its log
    # rank 0 is reported too: gloo's error when its peer vanished, or killed after the grace period
    assert re.search(r"rank 0: (exited with code 1|still running \d+ s after a peer failed)", text), text


def test_fatal_signal_is_named_with_the_log_tail() -> None:
    with pytest.raises(MultiProcessFailure, match="of 2 ranks failed running _abort_body") as info:
        run_multiprocess(_abort_body, world_size=2)
    text = str(info.value)
    assert "rank 0: died on signal SIGABRT" in text, text
    assert "rank 0 aborting" in text and "Fatal Python error: Aborted" in text  # faulthandler's stack


def test_hang_is_killed_at_the_deadline() -> None:
    with pytest.raises(MultiProcessFailure, match=r"rank 0: still running after the 5 s deadline \(killed\)"):
        run_multiprocess(_hang_body, world_size=2, timeout_s=5)
