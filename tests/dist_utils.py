"""Runs a test body in several gloo processes (CPU), like TorchRec's MultiProcessTestBase.

Spawning a rank costs about 7 s (it imports torch, torchrec and fbgemm), so the
ranks are kept: ``run_multiprocess`` hands each body to a *world*, ``world_size``
spawned processes joined once in a gloo process group through a ``file://``
store in a fresh temporary directory (no port to pick, so no port race), which
run the bodies they are given one after another. Every body runs with its own
log file per rank, its environment variables restored afterwards, and a barrier
at its end (no body starts while a peer is still in the last one).

On any failure (a body raised, a rank died on a signal, or the deadline passed)
the whole world is killed and the parent raises one ``MultiProcessFailure`` that
names every failed rank's outcome: its exception, or the signal that killed it,
plus the first and last lines of its log for that body. The next body gets a fresh world,
so no failure leaks into another test. ``MEMCOM_TEST_FRESH_WORLDS=1`` (or
``fresh=True``) spawns a world per body, as before the worlds were kept.

A world is shut down when the test session ends: each rank waits at a barrier,
destroys the process group and ends without interpreter finalization (see
``_serve``).
"""

import atexit
import datetime
import faulthandler
import multiprocessing
import os
import pickle
import queue
import shutil
import signal
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import pytest
import torch
import torch.distributed as dist
from torch import nn

# A rank that gets no answer from its peers fails after this many seconds (gloo timeout).
COLLECTIVE_TIMEOUT_S = 120
# One body, start to end on every rank. pytest-timeout (pyproject.toml) is the outer guard.
JOIN_TIMEOUT_S = 480
# Spawning a world and joining its process group.
START_TIMEOUT_S = 120
# After one rank fails, its peers get this long to finish or fail on their own before they are killed.
GRACE_S = 15
LOG_TAIL_LINES = 30
LOG_HEAD_LINES = 10


class MultiProcessFailure(AssertionError):
    """One or more ranks of a multi-process test failed, died or hung."""


def _serve(rank: int, world_size: int, root: str, tasks: Any, done: Any) -> None:
    """A rank of a world: joins the process group once, then runs bodies until told to stop (``None``)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    # One text stream on fd 1 for the whole life of the rank: each body's log file is dup2'ed
    # under fds 1 and 2, so Python's output, C++ output (gloo, "terminate called ...") and
    # logging handlers made by an earlier body all land in the current body's log.
    out = open(1, "w", buffering=1, closefd=False)
    sys.stdout = sys.stderr = out
    _redirect(os.path.join(root, f"start.rank{rank}.log"))
    faulthandler.enable(file=out, all_threads=True)  # a fatal signal prints every thread's Python stack
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{os.path.join(root, 'store')}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
        )
    except BaseException:  # noqa: B902
        _report_error(os.path.join(root, f"start.rank{rank}.error"), out)
        done.put((rank, "start", False))
        os._exit(1)
    done.put((rank, "start", True))
    while True:
        item = tasks.get()
        if item is None:
            break
        task_id, sys_path, payload = item
        _redirect(os.path.join(root, f"{task_id}.rank{rank}.log"))
        environ = dict(os.environ)
        try:
            sys.path[:] = sys_path  # the parent's: pytest adds test directories as it collects them
            fn, kwargs = pickle.loads(payload)
            fn(rank=rank, world_size=world_size, **kwargs)
            dist.barrier()  # every rank is done with this body before any starts the next
        except BaseException:  # noqa: B902 -- report anything, including KeyboardInterrupt and SystemExit
            _report_error(os.path.join(root, f"{task_id}.rank{rank}.error"), out)
            done.put((rank, task_id, False))
            # No teardown after a failure: a peer may still be inside a collective with us, and
            # gloo's destructor would abort this process and hide the error. The parent reports it.
            os._exit(1)
        os.environ.clear()
        os.environ.update(environ)
        out.flush()
        done.put((rank, task_id, True))
    dist.barrier()  # every rank is done with its peers before anyone tears down
    dist.destroy_process_group()
    # End without interpreter finalization. The bodies' sharded modules keep the Gloo process
    # group alive past destroy_process_group; destroying it during finalization can abort the
    # process (SIGABRT, "terminate called without an active exception") after the tests passed.
    # See memcom_torchrec.train.distributed_env.end_process.
    out.flush()
    os._exit(0)


def _redirect(path: str) -> None:
    sys.stdout.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _report_error(path: str, out: Any) -> None:
    with open(path, "w") as f:
        f.write(traceback.format_exc())
    out.flush()


def _tail(path: str, lines: int = LOG_TAIL_LINES, head: int = LOG_HEAD_LINES) -> str:
    """The first ``head`` and the last ``lines`` lines of a log (a fatal signal's stack dump of every
    thread is long: the body's first output is kept above it)."""
    if not os.path.exists(path):
        return "(no log)"
    with open(path, errors="replace") as f:
        text = f.read().rstrip().splitlines()
    if len(text) > head + lines:
        text = text[:head] + [f"... ({len(text) - head - lines} lines) ..."] + text[-lines:]
    return "\n".join(text) or "(empty log)"


def _outcome(rank: int, ok: Optional[bool], exitcode: Optional[int], killed: Optional[str], prefix: str) -> Optional[str]:
    """One rank's failure, in words, or None if it succeeded.

    Args:
        ok: what the rank reported for the body (None: nothing).
        exitcode: the process's exit code if it ended (negative: a signal).
        killed: why the parent killed it, if it did.
        prefix: the body's files, ``<prefix>.rank<r>.log`` / ``.error``.
    """
    error = f"{prefix}.rank{rank}.error"
    if ok and not os.path.exists(error):
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
    return what + f"\n--- rank {rank}'s log (its first and last lines) ---\n" + _tail(f"{prefix}.rank{rank}.log")


class _World:
    """``world_size`` spawned ranks in one gloo process group, running bodies one after another."""

    def __init__(self, world_size: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.world_size = world_size
        self.root = tempfile.mkdtemp(prefix="memcom-mp-")
        self.tasks = [ctx.SimpleQueue() for _ in range(world_size)]
        self.done = ctx.Queue()
        self.procs = [
            ctx.Process(target=_serve, args=(rank, world_size, self.root, self.tasks[rank], self.done), name=f"rank{rank}")
            for rank in range(world_size)
        ]
        self.count = 0
        for p in self.procs:
            p.start()
        self._wait("start", START_TIMEOUT_S, "joining the process group")

    def run(self, fn: Callable[..., Any], timeout_s: float, kwargs: Dict[str, Any]) -> None:
        self.count += 1
        task_id = f"body{self.count}"
        payload = pickle.dumps((fn, kwargs))
        for q in self.tasks:
            q.put((task_id, list(sys.path), payload))
        self._wait(task_id, timeout_s, f"running {fn.__name__}")
        for rank in range(self.world_size):
            os.remove(os.path.join(self.root, f"{task_id}.rank{rank}.log"))

    def _wait(self, task_id: str, timeout_s: float, what: str) -> None:
        """Waits for every rank's report on ``task_id``; on any failure kills the world and raises."""
        __tracebackhide__ = True
        reports: Dict[int, bool] = {}
        deadline, why = time.monotonic() + timeout_s, f"still running after the {timeout_s:.0f} s deadline"
        peer_failed = False
        while len(reports) < self.world_size and time.monotonic() < deadline:
            try:
                rank, tid, ok = self.done.get(timeout=0.05)
                if tid == task_id:
                    reports[rank] = ok
            except queue.Empty:
                pass
            dead = any(not p.is_alive() and r not in reports for r, p in enumerate(self.procs))
            if not peer_failed and (dead or not all(reports.values())):
                # one rank failed: its peers may be stuck in a collective with it
                peer_failed, why = True, f"still running {GRACE_S} s after a peer failed"
                deadline = min(deadline, time.monotonic() + GRACE_S)
        if len(reports) == self.world_size and all(reports.values()):
            return
        killed: Dict[int, str] = {}
        for rank, p in enumerate(self.procs):
            if p.is_alive() and rank not in reports:
                killed[rank] = why
        self.kill()
        prefix = os.path.join(self.root, task_id)
        failures = [
            f for rank, p in enumerate(self.procs)
            if (f := _outcome(rank, reports.get(rank), p.exitcode, killed.get(rank), prefix))
        ]
        self.discard()
        raise MultiProcessFailure(f"{len(failures)} of {self.world_size} ranks failed {what}:\n\n" + "\n\n".join(failures))

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
            p.join()

    def discard(self) -> None:
        """Kills every rank and removes the world's files (a failed, dead or interrupted world)."""
        self.kill()
        shutil.rmtree(self.root, ignore_errors=True)

    def close(self, timeout_s: float = 30) -> None:
        """Stops every rank (barrier, process group destroyed), killing those that do not end in time."""
        for q in self.tasks:
            q.put(None)
        deadline = time.monotonic() + timeout_s
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
        self.discard()


_WORLDS: Dict[int, _World] = {}


@atexit.register
def close_worlds() -> None:
    """Shuts every kept world down (at the end of the test session)."""
    while _WORLDS:
        _WORLDS.popitem()[1].close()


def run_multiprocess(
    fn: Callable[..., Any], world_size: int = 2, timeout_s: float = JOIN_TIMEOUT_S, fresh: bool = False,
    **kwargs: Any
) -> None:
    """Runs ``fn(rank=, world_size=, **kwargs)`` on ``world_size`` gloo ranks.

    Args:
        fn (Callable[..., Any]): a module-level (picklable) test body.
        world_size (int): number of processes.
        timeout_s (float): deadline for the body; ranks still running then are killed.
        fresh (bool): run in a world of its own, spawned for this body and shut down after it.
        **kwargs: passed on to ``fn``.

    Raises:
        MultiProcessFailure: if any rank raised, died on a signal or missed the deadline,
            with every failed rank's traceback or signal and the first and last lines of its log.
    """
    __tracebackhide__ = True  # pytest shows the ranks' failures, not this loop
    fresh = fresh or os.environ.get("MEMCOM_TEST_FRESH_WORLDS") == "1"
    world = None if fresh else _WORLDS.pop(world_size, None)
    if world is not None and not world.alive():
        world.discard()
        world = None
    try:
        if world is None:
            world = _World(world_size)
        world.run(fn, timeout_s, kwargs)
    except BaseException:
        if world is not None:  # a failed world is already discarded; an interrupted one is discarded here
            world.discard()
        raise
    if fresh:
        world.close()
    else:
        _WORLDS[world_size] = world


def train_body(rank: int, world_size: int, cfg: Any) -> None:
    """A body that trains one run (``memcom_torchrec.train.trainer.train``) on the world's ranks."""
    from memcom_torchrec.train.trainer import train

    train(cfg)


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


def require_kernel(kernel: Optional[str]) -> None:
    """Skips (a failure under MEMCOM_NO_SKIPS, as in CI) where the compiled ``w`` op was not built.

    Args:
        kernel (Optional[str]): ``"compiled"``, ``"aten"`` or None (the default implementation).
    """
    from memcom_torchrec.optim import fused_step

    if kernel == fused_step.COMPILED:
        try:
            fused_step.set_kernel(fused_step.COMPILED)
        except RuntimeError as e:
            pytest.skip(str(e))
        finally:
            fused_step.set_kernel(None)
