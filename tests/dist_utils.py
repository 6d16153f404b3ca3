"""Runs a test body in several gloo processes (CPU), like TorchRec's MultiProcessTestBase.

Each rank is a spawned process that joins a process group through a ``file://``
store in a fresh temporary directory (no port to pick, so no port race). A rank
writes its stdout/stderr to a log file of its own and, when its body raises, its
traceback to an error file. The parent joins every rank with a deadline and, on
any failure, raises one ``MultiProcessFailure`` that names every rank's outcome:
its exception, or the signal that killed it, plus the last lines of its log.

A rank whose body succeeded waits at a barrier for its peers, destroys the
process group (no rank tears down gloo while a peer still talks to it), and
ends without interpreter finalization (see ``_worker``).
"""

import datetime
import faulthandler
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

# A rank that gets no answer from its peers fails after this many seconds (gloo timeout).
COLLECTIVE_TIMEOUT_S = 120
# The whole multi-process run, start to join. pytest-timeout (pyproject.toml) is the outer guard.
JOIN_TIMEOUT_S = 480
# After one rank fails, its peers get this long to finish or fail on their own before they are killed.
GRACE_S = 15
LOG_TAIL_LINES = 25


class MultiProcessFailure(AssertionError):
    """One or more ranks of a multi-process test failed, died or hung."""


def _worker(rank: int, world_size: int, root: str, fn: Callable[..., Any], kwargs: Dict[str, Any]) -> None:
    log = open(os.path.join(root, f"rank{rank}.log"), "w", buffering=1)
    os.dup2(log.fileno(), 1)  # C++ output (gloo, "terminate called ...") lands here too
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    faulthandler.enable(file=log, all_threads=True)  # a fatal signal prints every thread's Python stack
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{os.path.join(root, 'store')}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
        )
        fn(rank=rank, world_size=world_size, **kwargs)
        dist.barrier()  # every rank is done with its peers before anyone tears down
        dist.destroy_process_group()
    except BaseException:  # noqa: B902 -- report anything, including KeyboardInterrupt and SystemExit
        with open(os.path.join(root, f"rank{rank}.error"), "w") as f:
            f.write(traceback.format_exc())
        log.flush()
        # No teardown after a failure: a peer may still be inside a collective with us, and
        # gloo's destructor would abort this process and hide the error. The parent reports it.
        os._exit(1)
    # Success: end without interpreter finalization. The body's sharded modules keep the Gloo
    # process group alive past destroy_process_group; destroying it during finalization can
    # abort the process (SIGABRT, "terminate called without an active exception") after the
    # test passed. See memcom_torchrec.train.distributed_env.end_process.
    log.flush()
    os._exit(0)


def _tail(path: str, lines: int = LOG_TAIL_LINES) -> str:
    if not os.path.exists(path):
        return "(no log)"
    with open(path, errors="replace") as f:
        text = f.read().rstrip().splitlines()
    return "\n".join(text[-lines:]) or "(empty log)"


def _outcome(rank: int, exitcode: Optional[int], killed: Optional[str], root: str) -> Optional[str]:
    """One rank's failure, in words, or None if it succeeded."""
    error = os.path.join(root, f"rank{rank}.error")
    if exitcode == 0 and not os.path.exists(error):
        return None
    if killed is not None:
        what = f"rank {rank}: {killed} (killed)"
    elif exitcode is not None and exitcode < 0:
        what = f"rank {rank}: died on signal {signal.Signals(-exitcode).name}"
    else:
        what = f"rank {rank}: exited with code {exitcode}"
    if os.path.exists(error):
        with open(error) as f:
            what += "\n" + f.read().rstrip()
    return what + f"\n--- last lines of rank {rank}'s log ---\n" + _tail(os.path.join(root, f"rank{rank}.log"))


def run_multiprocess(
    fn: Callable[..., Any], world_size: int = 2, timeout_s: float = JOIN_TIMEOUT_S, **kwargs: Any
) -> None:
    """Runs ``fn(rank=, world_size=, **kwargs)`` on ``world_size`` gloo ranks.

    Args:
        fn (Callable[..., Any]): a module-level (picklable) test body.
        world_size (int): number of processes.
        timeout_s (float): deadline for the whole run; ranks still alive then are killed.
        **kwargs: passed on to ``fn``.

    Raises:
        MultiProcessFailure: if any rank raised, died on a signal or missed the deadline,
            with every failed rank's traceback or signal and the tail of its log.
    """
    __tracebackhide__ = True  # pytest shows the ranks' failures, not this loop
    ctx = multiprocessing.get_context("spawn")
    root = tempfile.mkdtemp(prefix="memcom-mp-")
    procs: List[multiprocessing.process.BaseProcess] = [
        ctx.Process(target=_worker, args=(rank, world_size, root, fn, kwargs), name=f"rank{rank}")
        for rank in range(world_size)
    ]
    killed: Dict[int, str] = {}
    try:
        for p in procs:
            p.start()
        deadline, why = time.monotonic() + timeout_s, f"still running after the {timeout_s:.0f} s deadline"
        peer_failed = False
        while time.monotonic() < deadline and any(p.is_alive() for p in procs):
            if not peer_failed and any(p.exitcode not in (None, 0) for p in procs):
                # one rank failed: its peers may be stuck in a collective with it
                peer_failed, why = True, f"still running {GRACE_S} s after a peer failed"
                deadline = min(deadline, time.monotonic() + GRACE_S)
            time.sleep(0.05)
        for rank, p in enumerate(procs):
            if p.is_alive():
                killed[rank] = why
                p.kill()
            p.join()
        failures = [f for rank, p in enumerate(procs) if (f := _outcome(rank, p.exitcode, killed.get(rank), root))]
        if failures:
            raise MultiProcessFailure(
                f"{len(failures)} of {world_size} ranks failed running {fn.__name__}:\n\n" + "\n\n".join(failures)
            )
    finally:
        for p in procs:
            if p.is_alive():  # the parent itself was interrupted (pytest-timeout, Ctrl-C)
                p.kill()
        shutil.rmtree(root, ignore_errors=True)


def shard_with_planner(
    module: nn.Module,
    sharders: Sequence[Any],
    sharding_types: Dict[str, str],
    local_world_size: Optional[int] = None,
) -> Any:
    """Plans ``module`` collectively over the current process group and wraps it in DMP.

    Args:
        module (nn.Module): the unsharded model (tables on ``meta``).
        sharders (Sequence[ModuleSharder]): the sharders DMP may use.
        sharding_types (Dict[str, str]): table name -> the one sharding type it must get.
        local_world_size (Optional[int]): ranks per node (fewer than the world simulates several nodes).

    Returns:
        DistributedModelParallel: on CPU, gloo.
    """
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.distributed.types import ShardingEnv

    world_size = dist.get_world_size()
    constraints = {t: ParameterConstraints(sharding_types=[st]) for t, st in sharding_types.items()}
    topology = Topology(world_size=world_size, local_world_size=local_world_size, compute_device="cpu")
    plan = EmbeddingShardingPlanner(topology=topology, constraints=constraints).collective_plan(
        module, list(sharders), dist.group.WORLD
    )
    return DistributedModelParallel(
        module, env=ShardingEnv.from_process_group(dist.group.WORLD), device=torch.device("cpu"), plan=plan,
        sharders=list(sharders),
    )


def run_pipeline(pipeline: Any, batches: Iterator[Any]) -> List[float]:
    """Steps a TorchRec train pipeline through ``batches``; returns every step's loss."""
    it, losses = iter(batches), []
    while True:
        try:
            loss, _, _ = pipeline.progress(it)
        except StopIteration:
            return losses
        losses.append(float(loss))


def assert_sharded_steps_match(
    dmp: Any, ref: nn.Module, optimizer: str, lr: float, steps: int, batches: Callable[[int, int], List[Any]],
    keys: List[str],
) -> None:
    """Steps a sharded collection and its unsharded twin on the same batches; outputs and states must match.

    Each step: this rank's pooled output against the twin's on the global batch
    (``reference.reference_step``), then the fused update, then every tensor of the
    twin's ``state_dict`` against the gathered sharded one (1e-5).

    Args:
        dmp: the sharded collection (DMP), loaded with ``ref``'s state.
        ref (nn.Module): the unsharded twin (updated in place).
        optimizer (str): the reference update rule (``reference.ReferenceOptimizer``).
        lr (float): its learning rate.
        steps (int): steps.
        batches (Callable[[int, int], List[Any]]): ``(step, world_size)`` -> every rank's ``(kjt, proj)``.
        keys (List[str]): output keys in order.
    """
    from memcom_torchrec.distributed.state_dict_utils import gather_unsharded_state_dict
    from reference import ReferenceOptimizer, in_key_order, reference_step

    rank, world_size = dist.get_rank(), dist.get_world_size()
    ref_opt = ReferenceOptimizer(optimizer, lr)
    for step in range(steps):
        data = batches(step, world_size)
        kjt, proj = data[rank]
        out = in_key_order(dmp(kjt).wait(), keys)
        expected, _ = reference_step(ref, ref_opt, data, world_size)
        torch.testing.assert_close(out, expected[rank], atol=1e-5, rtol=1e-5)
        (out * proj).sum().backward()
        dmp.fused_optimizer.step()
        got = gather_unsharded_state_dict(dmp, dst=None)
        for name, value in ref.state_dict().items():
            torch.testing.assert_close(got[name], value, atol=1e-5, rtol=1e-5, msg=lambda m: f"step {step} {name}: {m}")
