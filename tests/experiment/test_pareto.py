"""memcom-pareto: programs measured by the runtime on the whole test split, the frontier, bad input."""

import csv
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from memcom_torchrec.experiment.pareto import (
    COLUMNS, frontier, label_training, main, measure_grid, read_points, remeasure_latency, report, training_of,
)
from memcom_torchrec.experiment.grid import rewrite_csv
from memcom_torchrec.models.builder import build_model, load_trained_model
from memcom_torchrec.models.checkpoint import save_checkpoint
from memcom_torchrec.train.config import TrainConfig
from output_checks import noise_lines


def _point(method: str, dtype: str, size: int, ndcg: float, valid: float = 0.1):
    return {"method": method, "dtype": dtype, "pte_bytes": str(size), "ndcg@k": str(ndcg), "run_dir": method + dtype,
            "valid_ndcg@k": str(valid)}


def test_frontier_keeps_points_nothing_beats():
    pts = [_point("a", "fp32", 1000, 0.10), _point("a", "int8", 300, 0.099), _point("b", "int8", 200, 0.08),
           _point("c", "int8", 250, 0.07), _point("d", "int4", 100, 0.05), _point("e", "int4", 100, 0.06)]
    assert [(p["method"], p["dtype"]) for p in frontier(pts)] == [
        ("e", "int4"), ("b", "int8"), ("a", "int8"), ("a", "fp32")]


def test_training_is_labelled_and_old_points_upgraded(tmp_path):
    """QAT / distilled runs and other MLP widths are told apart from their plain twins, also in a pareto.csv older
    than the columns."""
    assert training_of({"teacher": "", "qat": "", "init_from": ""}) == "plain"
    assert training_of({"teacher": "runs/h5"}) == "kd"
    assert training_of({"qat": "int4", "init_from": "runs/a"}) == "qat int4 fine-tuned"
    assert training_of({"teacher": "runs/h5", "qat": "int8"}) == "kd+qat int8"
    cfg = TrainConfig(method="uncompressed", embedding_dim=8, hidden=[16, 8], use_user_id=False, scorer="tied",
                      qat="int4", init_from="runs/plain_twin")
    model, _ = build_model(cfg, 5, 20, torch.device("cpu"), seed=0)
    run = str(tmp_path / "runs" / "qat")
    save_checkpoint(os.path.join(run, "best"), 1, model, meta={"config": asdict(cfg)})
    old_columns = [c for c in COLUMNS if c not in ("training", "mlp")]
    out = tmp_path / "pareto"
    os.makedirs(out)
    rows = [{"method": "uncompressed", "compression_ratio": "1", "item_table_ratio": "1.0", "dtype": d,
             "kind": "next_item/tied", "seed": "0", "pte_bytes": str(b), "table_bytes": "1", "linear_bytes": "1",
             "ndcg@k": str(n), "hr@k": "0.2", "test_users": "5", "valid_ndcg@k": "0.1", "latency_ms": "1",
             "parity": "1e-6", "run_dir": run, "pte": "x.pte"} for d, b, n in (("fp32", 4000, 0.15), ("int4", 900, 0.14))]
    rewrite_csv(str(out / "pareto.csv"), rows, old_columns)
    points = read_points(str(out / "pareto.csv"))
    assert "training" not in points[0]
    assert "| - |" in report(str(out))  # unknown until upgraded, never called plain
    assert label_training(points) and {(p["training"], p["mlp"]) for p in points} == {("qat int4 fine-tuned", "16-8")}
    assert not label_training(points)
    rewrite_csv(str(out / "pareto.csv"), points, COLUMNS)
    md = report(str(out))
    assert "| int4 | qat int4 fine-tuned | 16-8 |" in md
    assert "Frontier, smallest first: uncompressed 1x MLP 16-8 int4 (qat int4 fine-tuned) (1 KB)" in md
    os.rename(os.path.join(run, "best"), os.path.join(run, "gone"))
    with pytest.raises(ValueError, match="no checkpoint at .*qat"):  # a point without the column whose run is gone
        label_training([{k: v for k, v in points[0].items() if k != "training"}])


def test_bad_input_is_named_before_any_work(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"unknown dtype\(s\) \['int3'\]"):
        measure_grid(str(tmp_path / "r.csv"), "data", str(tmp_path), ["int8", "int3"])
    with pytest.raises(ValueError, match="no results file"):
        measure_grid(str(tmp_path / "r.csv"), "data", str(tmp_path), ["int8"])
    path = tmp_path / "r.csv"
    path.write_text("method,run_dir\nmemcom,/nowhere/run\n")
    assert main(["--results", str(path), "--data-dir", "d", "--out-dir", str(tmp_path / "o")]) == 2
    assert "lists run directories that are not here: ['/nowhere/run']" in capsys.readouterr().err
    # a missing dataset is named before any export (the runs exist here)
    path.write_text(f"method,run_dir\nmemcom,{tmp_path}\n")
    assert main(["--results", str(path), "--data-dir", str(tmp_path / "no_data"), "--out-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("memcom-pareto: ") and "no_data" in err and len(err.splitlines()) == 1
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.slow
def test_points_are_the_programs_own_figures(ml100k_dir: str, tmp_path):
    """Each point's nDCG is what its .pte scores on every test user, which equals the eager twin's."""
    pytest.importorskip("executorch")
    from memcom_torchrec.data import make_dataloader, read_manifest
    from memcom_torchrec.eval.metrics import RankingTotals, ranking_totals, target_ranks
    from memcom_torchrec.export import build_slim_model, kjt_to_inputs

    manifest = read_manifest(ml100k_dir)
    rows = []
    for method in ("uncompressed", "memcom"):
        cfg = TrainConfig(method=method, compression_ratio=16.0 if method == "memcom" else 1.0, embedding_dim=32,
                          hidden=[32], use_user_id=False, scorer="tied", history_len=10)
        torch.manual_seed(1)
        model, _ = build_model(cfg, int(manifest["num_users"]), int(manifest["num_items"]), torch.device("cpu"), seed=1)
        run = str(tmp_path / "runs" / method)
        save_checkpoint(os.path.join(run, "best"), 1, model, meta={"config": asdict(cfg)})
        rows.append({"method": method, "compression_ratio": cfg.compression_ratio, "item_table_ratio": "",
                     "seed": 0, "valid_ndcg@k": 0.1 if method == "uncompressed" else 0.05, "run_dir": run})
    results = tmp_path / "results.csv"
    with open(results, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = str(tmp_path / "pareto")
    # the command a user runs: its output is its progress and one table, nothing from the libraries
    proc = subprocess.run([sys.executable, "-m", "memcom_torchrec.experiment.pareto", "--results", str(results),
                           "--data-dir", ml100k_dir, "--out-dir", out, "--dtypes", "fp32", "int8", "--batch-size", "128",
                           "--repeats", "3", "--compact"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert noise_lines(proc.stdout + proc.stderr) == [], proc.stdout + proc.stderr
    table = proc.stdout.strip().splitlines()
    assert table[0].startswith("| model | dtype | .pte KB | nDCG@10 (.pte) |") and len(table) == 2 + 4, table
    points = read_points(os.path.join(out, "pareto.csv"))
    assert len(points) == 4 and all(int(p["test_users"]) == int(manifest["num_users"]) for p in points)
    assert all(float(p["parity"]) <= 1e-5 and os.path.getsize(p["pte"]) == int(p["pte_bytes"]) for p in points)
    assert {(p["training"], p["mlp"]) for p in points} == {("plain", "32")}  # from each run's checkpoint
    by = {(p["method"], p["dtype"]): p for p in points}
    assert int(by["memcom", "int8"]["table_bytes"]) < int(by["memcom", "fp32"]["table_bytes"]) / 2  # w: fp16
    # the eager twin of one program, scored here on the same split
    model, _ = load_trained_model(rows[1]["run_dir"])
    slim = build_slim_model(model, "int8")
    totals = RankingTotals()
    with torch.no_grad():
        for batch in make_dataloader(ml100k_dir, "test", 128, history_len=10, num_workers=0, with_user=False):
            ranks = target_ranks(slim(*kjt_to_inputs(batch.sparse_features, False)), batch.labels,
                                 batch.exclude.lengths(), batch.exclude.values())
            totals = totals.add(ranking_totals(ranks, 10))
    assert abs(float(by["memcom", "int8"]["ndcg@k"]) - totals.mean_ndcg) < 1e-6
    # resumes: nothing is measured twice
    assert len(measure_grid(str(results), ml100k_dir, out, ["fp32", "int8"], batch_size=128, repeats=3)) == 4
    before = [p["latency_ms"] for p in read_points(os.path.join(out, "pareto.csv"))]
    after = remeasure_latency(out, repeats=3)
    assert len(after) == 4 and all(float(p["latency_ms"]) > 0 for p in after) and len(before) == 4
    assert [p["ndcg@k"] for p in after] == [p["ndcg@k"] for p in read_points(os.path.join(out, "pareto.csv"))]
    md = report(out)
    assert "Base: uncompressed fp32" in md and os.path.exists(os.path.join(out, "pareto.png"))
