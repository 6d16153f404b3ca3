"""The scale benchmark, tiny: the real trainer on 2 processes for both methods; figures checked, not timed."""

import csv
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.slow


def test_tiny_scale_run_reports_every_figure(tmp_path) -> None:
    out = tmp_path / "scale"
    cmd = [
        sys.executable, os.path.join(ROOT, "benchmarks", "bench_scale.py"),
        "--data-dir", str(tmp_path / "synth"), "--out", str(out),
        "--users", "3000", "--items", "8000", "--interactions", "60000",
        "--max-steps", "12", "--batch-size", "256", "--eval-users", "96", "--eval-batch-size", "16",
        "--methods", "memcom", "uncompressed",  # qr and hashing run the same code path
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(out / "scale.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"memcom", "uncompressed"}
    for method, r in rows.items():
        assert int(r["steps"]) == 12, (method, r)
        # the fixed user sample: ceil(96 / (2 ranks x 16)) = 3 batches per rank, all full
        assert int(r["eval_users"]) == 96, (method, r)
        assert float(r["rows_per_s_rank0"]) > 0 and float(r["rows_per_s_rank1"]) > 0, (method, r)
        assert 0 < float(r["train_peak_rss_mb_max"]) <= float(r["peak_rss_mb_max"]), (method, r)
        assert 0.0 <= float(r["test_ndcg@10"]) <= float(r["test_hr@10"]) <= 1.0, (method, r)
        # the per-user spread, summed across ranks: at most what a 0/1 outcome over 96 users could give
        assert 0.0 <= float(r["test_ndcg@10_se"]) <= 0.5 / 96**0.5 + 1e-4, (method, r)
        assert (float(r["test_ndcg@10_se"]) > 0) == (float(r["test_ndcg@10"]) > 0), (method, r)
    # item and user tables both compressed 16x; the uncompressed run holds n x d floats and one
    # row-wise Adagrad accumulator per row, as the trainer measured them on its ranks
    plain_params = (8000 + 3000) * 64 * 4 / 2**20
    assert float(rows["uncompressed"]["embedding_param_mb_total"]) == pytest.approx(plain_params, rel=1e-3)
    assert float(rows["uncompressed"]["embedding_mb_total"]) == pytest.approx(
        plain_params + (8000 + 3000) * 4 / 2**20, rel=1e-3
    )
    assert float(rows["memcom"]["ratio"]) >= 16.0
    assert float(rows["memcom"]["embedding_param_mb_total"]) == pytest.approx(plain_params / 16, rel=0.02)
    table = (out / "scale.md").read_text()
    assert "memcom / uncompressed: interactions/s" in table and "embedding parameters" in table
