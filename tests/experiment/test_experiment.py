"""memcom-experiment: the grid writes every required column, resumes, and refuses mismatched runs."""

import csv
import json
import os
import shutil
from typing import List

import pytest

from memcom_torchrec.experiment import grid as experiment
from memcom_torchrec.experiment.grid import FIELDS, append_result, main, read_results

pytestmark = pytest.mark.slow

REQUIRED = [
    "dataset", "model", "method", "compression_ratio", "embedding_params", "embedding_bytes",
    "ndcg@k", "hr@k", "relative_loss", "seed", "train_seconds", "k",
]
TRAIN_ARGS = ["--epochs", "1", "--max-steps", "15", "--eval-batch-size", "2048"]


LRS = ["0.05", "0.3"]


def grid(ml100k_dir: str, out: str, train_args: List[str], lrs: List[str] = LRS) -> int:
    """``memcom-experiment`` over uncompressed and MEmCom 16x; its exit status."""
    return main(["--data-dir", ml100k_dir, "--out-dir", out, "--methods", "uncompressed", "memcom", "--ratios", "16",
          "--embedding-lrs", *lrs, "--launcher", "python", "--", *train_args])


def test_grid_writes_resumes_and_refuses_other_args(ml100k_dir: str, tmp_path, monkeypatch, capsys) -> None:
    out = str(tmp_path / "grid")
    assert grid(ml100k_dir, out, TRAIN_ARGS) == 0
    rows = read_results(os.path.join(out, "results.csv"))
    assert [(r["method"], float(r["compression_ratio"])) for r in rows] == [("uncompressed", 1.0), ("memcom", 16.0)]
    for r in rows:
        assert all(r[k] != "" for k in REQUIRED), r
        assert r["train_args"] == " ".join(TRAIN_ARGS)
        assert float(r["train_seconds"]) > 0
    assert float(rows[0]["relative_loss"]) == 0.0
    assert all(r["k"] == "10" for r in rows)
    base, mem = float(rows[0]["ndcg@k"]), float(rows[1]["ndcg@k"])
    assert float(rows[1]["relative_loss"]) == pytest.approx((base - mem) / base)
    assert float(rows[1]["item_table_ratio"]) >= 16.0
    # Each cell keeps the learning rate best on validation, among runs that all exist.
    for r in rows:
        assert r["embedding_lrs"] == "0.05 0.3"
        valid = {}
        for lr in LRS:
            run = os.path.join(out, "runs", experiment.run_key(r["method"], float(r["compression_ratio"]), 0, float(lr)))
            valid[lr] = json.load(open(os.path.join(run, "metrics.json")))["valid_ndcg"]
        assert float(r["valid_ndcg@k"]) == max(valid.values())
        assert float(r["embedding_lr"]) == float(max(valid, key=valid.get))
    table = open(os.path.join(out, "results.md")).read()
    assert "| memcom | 16 |" in table and "popularity" in table
    within = float(rows[1]["relative_loss"]) <= 0.04
    assert ("- memcom: 16x" if within else "- memcom: none of the ratios tried") in table
    assert os.path.getsize(os.path.join(out, "results.png")) > 1000

    # Resumed: nothing trains again.
    def no_training(*args, **kwargs):  # pragma: no cover - must not run
        raise AssertionError("a finished cell was trained again")

    monkeypatch.setattr(experiment, "run_one", no_training)
    grid(ml100k_dir, out, TRAIN_ARGS)
    assert len(read_results(os.path.join(out, "results.csv"))) == 2

    # Other training flags into the same directory: a clear one-line error (exit 1), not a silent mix.
    capsys.readouterr()
    other = str(tmp_path / "ml-100k-copy")
    shutil.copytree(ml100k_dir, other)
    for data, args, lrs, message in [
        (ml100k_dir, TRAIN_ARGS + ["--dropout", "0.25"], LRS, "uncompressed 1x seed 0 has train_args"),
        (ml100k_dir, TRAIN_ARGS, ["0.1"], "has embedding_lrs '0.05 0.3', this grid passes '0.1'"),
        (other, TRAIN_ARGS, LRS, "has dataset 'ml-100k'"),
    ]:
        assert grid(data, out, args, lrs) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("memcom-experiment: error: ") and message in err[0], err


@pytest.mark.parametrize("train_args,refused", [(["--seed=3"], "['--seed=3']"),
                                                (["--epochs", "1", "--embedding-lr", "0.1"], "['--embedding-lr']")],
                         ids=["seed=3", "embedding-lr 0.1"])
def test_flags_the_grid_sets_are_refused(ml100k_dir: str, tmp_path, capsys, train_args: List[str],
                                         refused: str) -> None:
    """A flag the grid sets itself, after '--': argparse's usage error (exit 2) naming it, before any run."""
    out = tmp_path / "g"
    with pytest.raises(SystemExit, match="^2$") as exited:  # argparse's usage error
        grid(ml100k_dir, str(out), train_args)
    assert exited.value.code == 2  # argparse's usage error
    err = capsys.readouterr().err
    assert f"error: {refused} after '--': the grid sets --method, --compression-ratio, --seed" in err
    assert not out.exists()  # refused before anything ran


def test_cells_a_method_cannot_reach_are_named_and_skipped(ml100k_dir: str, tmp_path, capsys) -> None:
    # ML-100K: 1,682 items (QR: at most ~20x), 943 users (QR: at most ~15x).
    assert "is unreachable with method 'qr' for num_embeddings=1682" in experiment.unreachable(ml100k_dir, "qr", 40.0, [])
    assert "unreachable with method 'memcom_qr'" in experiment.unreachable(ml100k_dir, "memcom_qr", 16.0, [])
    assert experiment.unreachable(ml100k_dir, "qr", 16.0, []) is None
    assert experiment.unreachable(ml100k_dir, "qr", 16.0, ["--compressed-tables", "user"]) is not None
    assert experiment.unreachable(ml100k_dir, "memcom", 40.0, []) is None
    assert experiment.unreachable(ml100k_dir, "uncompressed", 40.0, []) is None
    # the variants: two scalars per entity cap memcom_2hash below d/2; an int16 assignment caps memcom_clustered
    assert "unreachable with method 'memcom_2hash' for num_embeddings=1682, embedding_dim=64: at most 31.4" in (
        experiment.unreachable(ml100k_dir, "memcom_2hash", 32.0, []))
    assert "unreachable with method 'memcom_clustered'" in experiment.unreachable(ml100k_dir, "memcom_clustered", 42.0, [])
    assert experiment.unreachable(ml100k_dir, "memcom_clustered", 40.0, []) is None
    out = str(tmp_path / "skipped")
    # nothing ran: a non-zero exit, one line each
    assert main(["--data-dir", ml100k_dir, "--out-dir", out, "--methods", "qr", "--ratios", "40",
                 "--launcher", "python"]) == 1
    printed = capsys.readouterr().err.splitlines()
    assert printed[0].startswith("memcom-experiment: skipping qr at 40x: table 'item': compression_ratio 40")
    assert printed[1].startswith("memcom-experiment: error: every cell was skipped, nothing ran") and len(printed) == 2
    assert not os.listdir(os.path.join(out, "runs"))
    assert main(["--data-dir", ml100k_dir, "--out-dir", out, "--methods", "memcom_2hash", "--ratios", "32",
                 "--launcher", "python"]) == 1
    assert "skipping memcom_2hash at 32x" in capsys.readouterr().err
    assert not os.listdir(os.path.join(out, "runs"))


def test_run_dir_with_other_args_is_not_reused(ml100k_dir: str, tmp_path) -> None:
    out = str(tmp_path / "grid")
    run_dir = os.path.join(out, "runs", experiment.run_key("memcom", 16.0, 0, 0.05))
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "experiment_args.json"), "w") as f:
        f.write('["--epochs", "3"]')
    with pytest.raises(ValueError, match="was trained with extra args"):
        experiment.run_one(ml100k_dir, out, "memcom", 16.0, 0, 0.05, 1, ["--epochs", "1"], "python")


def test_results_from_an_older_version_are_upgraded(tmp_path) -> None:
    path = str(tmp_path / "results.csv")
    # no train_args, no k, and the cut-off fixed in the column names
    legacy = {"ndcg@k": "ndcg@10", "hr@k": "hr@10", "valid_ndcg@k": "valid_ndcg@10"}
    old = [legacy.get(f, f) for f in FIELDS if f not in ("train_args", "k")]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=old)
        w.writeheader()
        w.writerow({k: "1" for k in old})
    append_result(path, {k: "2" for k in FIELDS})
    with open(path, newline="") as f:
        assert next(csv.reader(f)) == FIELDS  # rewritten in this version's columns
    rows = read_results(path)
    assert [r["train_args"] for r in rows] == ["", "2"]
    assert [r["k"] for r in rows] == ["10", "2"]
    assert [(r["ndcg@k"], r["hr@k"], r["valid_ndcg@k"]) for r in rows] == [("1", "1", "1"), ("2", "2", "2")]


def test_grid_with_another_cut_off(ml100k_dir: str, tmp_path) -> None:
    """``-- --k 5``: the trainer reports nDCG@5, the grid records k = 5 and says @5 in its report."""
    out = str(tmp_path / "k5")
    grid(ml100k_dir, out, TRAIN_ARGS + ["--k", "5"], lrs=["0.05"])
    rows = read_results(os.path.join(out, "results.csv"))
    assert [r["k"] for r in rows] == ["5", "5"]
    for r in rows:
        m = json.load(open(os.path.join(r["run_dir"], "metrics.json")))
        assert m["k"] == 5 and float(r["ndcg@k"]) == m["test_ndcg"] and float(r["hr@k"]) == m["test_hr"]
    table = open(os.path.join(out, "results.md")).read()
    assert "| nDCG@5 | HR@5 |" in table and "nDCG@10" not in table


def test_results_with_foreign_columns_are_refused(tmp_path) -> None:
    path = str(tmp_path / "results.csv")
    with open(path, "w") as f:
        f.write("user,item\n1,2\n")
    with pytest.raises(ValueError, match="do not match"):
        append_result(path, {k: "2" for k in FIELDS})
    assert open(path).read() == "user,item\n1,2\n"  # untouched


def _append_many(path: str, tag: str) -> None:
    for i in range(150):
        append_result(path, {"method": tag, "seed": i})


def _rewrite_many(path: str) -> None:
    for _ in range(150):
        with experiment._locked(path):
            if os.path.exists(path):
                experiment.rewrite_csv(path, read_results(path))  # what report() does with the relative losses


def test_concurrent_grids_lose_no_rows(tmp_path) -> None:
    """Two grids appending to one results.csv while a report rewrites it: every row survives."""
    import multiprocessing as mp

    path = str(tmp_path / "results.csv")
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(path, t)) for t in ("a", "b")]
    procs.append(ctx.Process(target=_rewrite_many, args=(path,)))
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    rows = read_results(path)
    assert sorted((r["method"], int(r["seed"])) for r in rows) == [(t, i) for t in ("a", "b") for i in range(150)]
