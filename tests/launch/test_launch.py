"""Launchers: TorchX components (local_cwd runs, kubernetes/slurm dry runs), torchrun, fault tolerance.

The slow tests launch real 2-process (gloo) jobs on ml-100k with a tiny model:
a torchrun run as the reference, then the same run through ``torchx run -s
local_cwd launch/components.py:train --max_restarts 1`` with one worker
SIGKILLed after its first checkpoint. The restarted job must resume from a
checkpoint and end bit-identical (parameters and optimizer state) to the
reference.
"""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from typing import Dict, List, Optional

import pytest

from memcom_torchrec.train.trainer import FAULT_AT_STEP_ENV
from checkpoint_utils import assert_same_checkpoint
from output_checks import noise_lines

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMPONENTS = os.path.join(REPO, "launch", "components.py")
BIN = os.path.dirname(sys.executable)
TORCHX = [sys.executable, "-m", "torchx.cli.main"]

MAX_STEPS, EVERY = 48, 8
MODEL = ["--hidden", "32", "--embedding-dim", "16", "--compression-ratio", "4", "--dropout", "0.1", "--seed", "3",
         "--eval-batch-size", "512"]
TINY = ["--epochs", "1", "--max-steps", str(MAX_STEPS), "--checkpoint-every", str(EVERY), "--keep-checkpoints", "10",
        "--batch-size", "64", *MODEL]


def _load_components():
    spec = importlib.util.spec_from_file_location("memcom_launch_components", COMPONENTS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


components = _load_components()


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")  # torchrun of this environment, as `source activate` does
    return env


def _run(cmd: List[str], timeout: float = 120, cwd: str = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(autouse=True)
def _venv_on_path(monkeypatch) -> None:
    """The components check that `torchrun` is on PATH, as after `source .venv/bin/activate`."""
    monkeypatch.setenv("PATH", _env()["PATH"])


@pytest.fixture(scope="session")
def ml100k(ml100k_dir: str) -> str:
    """A prepared ML-100K (conftest's fixture, under this file's name)."""
    return ml100k_dir


# ---------------------------------------------------------------- component checks (fast, no launch)


def test_train_component_builds_torchrun_command(ml100k: str) -> None:
    with pytest.warns(UserWarning, match="--checkpoint-every is not set"):
        app = components.train("--epochs", "2", "--hidden", "64", "32", data_dir=ml100k, out_dir="runs/x", j="1x2",
                               max_restarts=2, max_retries=1)
    role = app.roles[0]
    cmd = role.args[1]
    assert role.entrypoint == "bash" and role.args[0] == "-c"
    assert cmd.startswith("torchrun --max-restarts 2 ")
    assert "--nnodes 1 --nproc_per_node 2" in cmd
    assert f"-m memcom_torchrec.train --data-dir {ml100k} --out-dir runs/x --device cpu --epochs 2 --hidden 64 32" in cmd
    assert role.max_retries == 1 and role.num_replicas == 1
    assert role.env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"  # restarts need a fresh store per attempt
    assert role.resource.gpu == 0


def test_train_component_gpu() -> None:
    app = components.train(data_dir="/mnt/d", j="2x8", gpu=8, cpu=64, memMB=400000, check_paths=False)
    role = app.roles[0]
    assert role.num_replicas == 2 and role.resource.gpu == 8 and role.resource.cpu == 64
    assert "--device cuda" in role.args[1] and "--nproc_per_node 8" in role.args[1]
    with pytest.raises(components.LaunchError, match="at most one per GPU"):
        components.train(data_dir="/mnt/d", j="1x4", gpu=2, check_paths=False)
    with pytest.raises(components.LaunchError, match="needs GPUs"):
        components.train("--device", "cuda", data_dir="/mnt/d", check_paths=False)


def test_missing_data_dir_is_reported(tmp_path) -> None:
    missing = str(tmp_path / "nope")
    with pytest.raises(components.LaunchError, match=r"data_dir .*nope.* does not exist on this machine"):
        components.train(data_dir=missing)
    with pytest.raises(components.LaunchError, match="no manifest.json"):
        components.train(data_dir=str(tmp_path))
    components.train(data_dir=missing, check_paths=False)  # a path seen only by the job: not checked


def test_bad_trainer_flags_are_reported(ml100k: str) -> None:
    with pytest.raises(components.LaunchError, match="unknown trainer flag --max-step .*did you mean --max-steps"):
        components.train("--max-step", "3", data_dir=ml100k)
    with pytest.raises(components.LaunchError, match="use the component option --data_dir"):
        components.train("--data-dir", "x", data_dir=ml100k)
    with pytest.raises(components.LaunchError, match="--epochs takes an int, got 'two'"):
        components.train("--epochs", "two", data_dir=ml100k)
    with pytest.raises(components.LaunchError, match="not preceded by a --flag"):
        components.train("3", data_dir=ml100k)
    with pytest.raises(components.LaunchError, match="Invalid format for -j"):
        components.train(data_dir=ml100k, j="2x")


def test_other_components(ml100k: str, tmp_path) -> None:
    app = components.prepare_data("prepare", "--dataset", "ml-1m", "--out", "data/ml-1m")
    assert "-m memcom_torchrec.data.cli prepare --dataset ml-1m --out data/ml-1m" in app.roles[0].args[1]
    with pytest.raises(components.LaunchError, match="memcom-data command"):
        components.prepare_data("--dataset", "ml-1m")
    with pytest.raises(components.LaunchError, match="interaction log .*does not exist"):
        components.prepare_data("prepare", "--from", str(tmp_path / "log.csv"), "--out", "x")
    with pytest.raises(components.LaunchError, match="has no checkpoint"):
        components.evaluate(run_dir=str(tmp_path), data_dir=ml100k)
    app = components.export("--dtype", "int8", checkpoint=str(tmp_path), out="model.pte")
    assert f"-m memcom_torchrec.export --checkpoint {tmp_path} --out model.pte --dtype int8" in app.roles[0].args[1]
    with pytest.raises(components.LaunchError, match="checkpoint .*does not exist"):
        components.export(checkpoint=str(tmp_path / "nope"), out="model.pte")


# ---------------------------------------------------------------- torchx CLI: dry runs, fail-fast errors


def test_slurm_dryrun_renders(ml100k: str) -> None:
    r = _run(TORCHX + ["run", "-s", "slurm", "--dryrun", COMPONENTS + ":train", "--j", "2x4", "--gpu", "4",
                       "--data_dir", ml100k, "--out_dir", "runs/x", "--max_restarts", "2", "--max_retries", "3",
                       "--", "--epochs", "2"], timeout=60)
    assert r.returncode == 0, r.stderr
    assert "#SBATCH --job-name=train-0" in r.stdout and "--gpus-per-task=4" in r.stdout
    assert "TORCHX_MAX_RETRIES=3" in r.stdout
    assert "torchrun --max-restarts 2" in r.stdout and "-m memcom_torchrec.train" in r.stdout


def test_kubernetes_dryrun_renders() -> None:
    if importlib.util.find_spec("kubernetes") is None:
        pytest.skip("torchx's kubernetes scheduler builds its dry run from the `kubernetes` client models; "
                    "install kubernetes==25.3.0 (newer releases need urllib3>=2, torchx 0.7.0 pins urllib3<1.27)")
    r = _run(TORCHX + ["run", "-s", "kubernetes", "--dryrun", "--workspace", "", "-cfg", "queue=default",
                       COMPONENTS + ":train", "--j", "2x8", "--gpu", "8", "--image", "registry.example/memcom:1",
                       "--data_dir", "/mnt/data/ml-1m", "--out_dir", "/mnt/runs/x", "--check_paths", "False",
                       "--max_retries", "3", "--", "--epochs", "2"], timeout=60)
    assert r.returncode == 0, r.stderr
    assert "kind: Job" in r.stdout and "maxRetry: 3" in r.stdout and "nvidia.com/gpu: '8'" in r.stdout
    assert "image: registry.example/memcom:1" in r.stdout


def test_torchx_fails_fast_on_bad_arguments(tmp_path) -> None:
    """Bad arguments are refused before anything is scheduled: no torchx log dir, no run dir."""
    missing = str(tmp_path / "no-data")
    logs, run_dir = tmp_path / "torchx-logs", tmp_path / "run"
    local = TORCHX + ["run", "-s", "local_cwd", "-cfg", f"log_dir={logs}", COMPONENTS + ":train",
                      "--data_dir", missing, "--out_dir", str(run_dir)]
    r = _run(local)
    assert r.returncode != 0 and "does not exist on this machine" in r.stderr
    r = _run(local + ["--nosuch", "1"])
    assert r.returncode != 0 and "unrecognized arguments: --nosuch" in r.stderr
    assert not logs.exists() and not run_dir.exists()  # torchx makes <log_dir>/<session>/<app> on submit
    r = _run(TORCHX + ["run", "-s", "nosuch", COMPONENTS + ":train", "--data_dir", missing])
    assert r.returncode != 0 and "invalid choice: 'nosuch'" in r.stderr
    r = _run(TORCHX + ["run", "-s", "slurm", "--dryrun", COMPONENTS + ":train", "--data_dir", missing,
                       "--check_paths", "False", "--", "--epoch", "1"])
    assert r.returncode != 0 and "unknown trainer flag --epoch" in r.stderr
    # torchx 0.7.0 ignores unknown -cfg keys; launch/submit.py refuses them
    submit = [sys.executable, os.path.join(REPO, "launch", "submit.py")]
    r = _run(submit + ["-s", "slurm", "--dryrun", "-cfg", "partiton=gpu", COMPONENTS + ":train", "--data_dir", missing,
                       "--check_paths", "False"])
    assert r.returncode == 2 and "scheduler 'slurm' has no option 'partiton'; did you mean 'partition'?" in r.stderr
    r = _run(submit + ["-s", "slurm", "--dryrun", "-cfg", "partition=gpu,time=1:00:00", COMPONENTS + ":train",
                       "--data_dir", missing, "--check_paths", "False"])
    assert r.returncode == 0 and "--partition=gpu --time=1:00:00" in r.stdout


# ---------------------------------------------------------------- real jobs: torchrun, torchx, SIGKILL + resume


def _job_pids(out_dir: str, local_rank: Optional[int] = None) -> List[int]:
    """Processes of the job writing to out_dir: the torchrun agent and its workers, or only the worker of
    ``local_rank`` (workers have LOCAL_RANK in their environment, the agent does not)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if out_dir.encode() in cmd and b"memcom_torchrec.train" in cmd and (
            local_rank is None or f"LOCAL_RANK={local_rank}".encode() in env
        ):
            pids.append(int(pid))
    return pids


def _latest_step(out_dir: str) -> Optional[int]:
    try:
        with open(os.path.join(out_dir, "checkpoints", "LATEST")) as f:
            return int(f.read().strip().split("_")[1])
    except (OSError, ValueError, IndexError):
        return None


@pytest.fixture(scope="module")
def reference_run(ml100k: str, tmp_path_factory) -> str:
    """The uninterrupted run: ``torchrun --nproc-per-node 2 -m memcom_torchrec.train``."""
    out = str(tmp_path_factory.mktemp("ref") / "run")
    r = _run([os.path.join(BIN, "torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "memcom_torchrec.train",
              "--data-dir", ml100k, "--out-dir", out, "--device", "cpu", *TINY], timeout=240)
    assert r.returncode == 0, r.stderr[-4000:]
    with open(out + ".log", "w") as f:  # what the user saw
        f.write(r.stdout + r.stderr)
    return out


@pytest.mark.slow
def test_torchrun_entry_point(reference_run: str) -> None:
    with open(os.path.join(reference_run, "metrics.json")) as f:
        m = json.load(f)
    assert m["world_size"] == 2 and m["steps"] == MAX_STEPS and m["resumed_from_steps"] == []
    assert _latest_step(reference_run) == MAX_STEPS
    # the trainer's own lines only: no planner tables, kernel arguments or library notices
    with open(reference_run + ".log") as f:
        log = f.read()
    assert "memcom_torchrec.train.trainer: test nDCG@10" in log
    assert noise_lines(log) == [], log[-4000:]


@pytest.fixture(scope="module")
def resumed_run(ml100k: str, tmp_path_factory) -> Dict[str, object]:
    """The same run through ``torchx run -s local_cwd launch/components.py:train --max_restarts 1``, with the
    worker of rank 1 SIGKILLed by the trainer's fault hook right after the checkpoint of step ``EVERY``."""
    tmp = tmp_path_factory.mktemp("resumed")
    out, log_path = str(tmp / "run"), str(tmp / "torchx.log")
    cmd = TORCHX + ["run", "-s", "local_cwd", COMPONENTS + ":train", "--j", "1x2", "--max_restarts", "1",
                    "--env", f"{FAULT_AT_STEP_ENV}={EVERY}:1", "--data_dir", ml100k, "--out_dir", out, "--", *TINY]
    with open(log_path, "w") as log_file:
        job = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=log_file, stderr=subprocess.STDOUT)
    try:
        job.wait(timeout=240)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
        for pid in _job_pids(out):  # torchx starts the job in a session of its own: end it too
            os.kill(pid, signal.SIGKILL)
    with open(log_path) as f:
        log = f.read()
    return {"out": out, "returncode": job.returncode, "log": log}


@pytest.mark.slow
def test_sigkill_resumes_from_checkpoint_and_matches_uninterrupted_run(
    resumed_run: Dict[str, object], reference_run: str
) -> None:
    out, log = str(resumed_run["out"]), str(resumed_run["log"])
    assert resumed_run["returncode"] == 0, log[-4000:]
    assert "failed (exitcode: -9) local_rank: 1" in log and "SUCCEEDED" in log
    with open(os.path.join(out, "metrics.json")) as f:
        m = json.load(f)
    assert m["steps"] == MAX_STEPS and m["world_size"] == 2
    # one restart, from the checkpoint the killed rank had just completed
    assert f"{FAULT_AT_STEP_ENV}: killing rank 1 after the checkpoint of step {EVERY}" in log, log[-4000:]
    assert m["resumed_from_steps"] == [EVERY], m["resumed_from_steps"]
    # deterministic resume: parameters and optimizer states equal the uninterrupted run's, bit for bit
    assert_same_checkpoint(os.path.join(reference_run, "checkpoints", f"step_{MAX_STEPS:08d}"),
                            os.path.join(out, "checkpoints", f"step_{MAX_STEPS:08d}"))
    with open(os.path.join(reference_run, "metrics.json")) as f:
        ref = json.load(f)
    assert m["test_ndcg"] == ref["test_ndcg"] and m["test_hr"] == ref["test_hr"]


@pytest.mark.slow
def test_evaluate_component(resumed_run: Dict[str, object], reference_run: str, ml100k: str, tmp_path) -> None:
    """Re-evaluates the finished run on one process (DCP re-shards the 2-process checkpoint), training nothing;
    the model flags come from the run's saved config."""
    out = str(tmp_path / "run")  # a copy: the evaluation rewrites metrics.json, which other tests read
    shutil.copytree(str(resumed_run["out"]), out)
    app = components.evaluate(run_dir=out, data_dir=ml100k)
    assert "--compression-ratio 4.0" in app.roles[0].args[1] and "--hidden 32" in app.roles[0].args[1]
    r = _run(TORCHX + ["run", "-s", "local_cwd", COMPONENTS + ":evaluate", "--j", "1x1", "--run_dir", out,
                       "--data_dir", ml100k], timeout=180)
    assert r.returncode == 0, r.stderr[-4000:]
    with open(os.path.join(out, "metrics.json")) as f:
        e = json.load(f)
    with open(os.path.join(reference_run, "metrics.json")) as f:
        ref = json.load(f)
    assert e["steps"] == MAX_STEPS and e["world_size"] == 1 and e["resumed_from_steps"][-1] == MAX_STEPS
    assert e["test_ndcg"] == pytest.approx(ref["test_ndcg"], abs=1e-6)


@pytest.mark.slow
def test_export_component(resumed_run: Dict[str, object], tmp_path) -> None:
    if importlib.util.find_spec("executorch") is None:
        pytest.skip("memcom-export needs the export extra (executorch)")
    pte = str(tmp_path / "model.pte")
    r = _run(TORCHX + ["run", "-s", "local_cwd", COMPONENTS + ":export", "--checkpoint", str(resumed_run["out"]),
                       "--out", pte, "--", "--no-pt2"], timeout=240)
    assert r.returncode == 0, r.stderr[-4000:]
    assert os.path.getsize(pte) > 0


def test_fault_hook_is_checked_and_only_fires_in_a_first_attempt(monkeypatch) -> None:
    from memcom_torchrec.train.trainer import fault_at_step

    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    monkeypatch.setenv(FAULT_AT_STEP_ENV, "8:1")
    assert fault_at_step() == (8, 1)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # the restarted attempt trains on
    assert fault_at_step() is None
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    monkeypatch.setenv(FAULT_AT_STEP_ENV, "eight")
    with pytest.raises(ValueError, match=r"MEMCOM_FAULT_AT_STEP='eight': expected <step>:<rank>, e.g. 8:1"):
        fault_at_step()
