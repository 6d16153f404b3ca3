"""Shared fixtures: the prepared ML-100K (checked against its manifest) and one trained ML-100K run."""

import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# CI installs every extra (executorch, kubernetes), so there a skipped test is a lost check: it fails.
NO_SKIPS = os.environ.get("MEMCOM_NO_SKIPS") == "1"


def pytest_sessionstart(session) -> None:
    """Prints pytest-randomly's seed even under -q (rerun that order with ``--randomly-seed=N``)."""
    seed = getattr(session.config.option, "randomly_seed", None)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if seed is not None and reporter is not None:
        reporter.write_line(f"test order: random, seed {seed} (rerun it: --randomly-seed={seed}; "
                            "file order: -p no:randomly)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With ``MEMCOM_NO_SKIPS=1`` a skipped test is reported as failed, with its skip reason."""
    outcome = yield
    report = outcome.get_result()
    if NO_SKIPS and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped where every extra is installed (MEMCOM_NO_SKIPS=1): {reason}"


@pytest.fixture(scope="session")
def ml100k_dir(tmp_path_factory) -> str:
    """A prepared ML-100K: the repo's data/ml-100k if every file matches its manifest, else prepared afresh.

    A data directory left by an older version or edited by hand is not trusted: ``verify_dataset``
    checks each split file's size and sha256 against the manifest (and the source's checksum).
    """
    from memcom_torchrec.data import prepare_movielens
    from memcom_torchrec.data.errors import DataError
    from memcom_torchrec.data.manifest import verify_dataset

    local = os.path.join(REPO, "data", "ml-100k")
    if os.path.exists(os.path.join(local, "manifest.json")):
        try:
            verify_dataset(local)
            return local
        except DataError as e:
            print(f"not using {local}: {e}")
    out = str(tmp_path_factory.mktemp("data") / "ml-100k")
    prepare_movielens("ml-100k", out)
    return out


@pytest.fixture(scope="session")
def ml100k_run(ml100k_dir: str, tmp_path_factory) -> str:
    """One ML-100K run shared by the whole test session, trained with the main job's settings
    (MEmCom 16x, 2 gloo ranks, <= 6 epochs, patience 2). Tests read it; none may write into it."""
    from dist_utils import run_multiprocess, train_body
    from memcom_torchrec.train.config import TrainConfig

    cfg = TrainConfig(data_dir=ml100k_dir, out_dir=str(tmp_path_factory.mktemp("shared") / "memcom16"),
                      method="memcom", compression_ratio=16.0, epochs=6, patience=2)
    run_multiprocess(train_body, world_size=2, cfg=cfg)
    with open(os.path.join(cfg.out_dir, "metrics.json")) as f:
        assert json.load(f)["world_size"] == 2
    return cfg.out_dir
