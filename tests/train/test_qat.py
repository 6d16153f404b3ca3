"""Quantisation-aware training: what the trainer scores is what the exported program scores.

A ``--qat int4`` run on 2 gloo ranks validates and tests its model on the export's grid, so its
test nDCG@10 must equal the nDCG@10 of its int4 ``.pte`` run by the ExecuTorch runtime on the same
users (the whole test split); its checkpoint keeps float masters (the straight-through estimator's),
which the export quantises to that grid. Both pipelines: the ``tied`` scorer (TrainPipelineBase)
and the ``linear`` one (TrainPipelineSparseDist).
"""

import csv
import json
import os

import pytest
import torch

from dist_utils import run_multiprocess, train_body
from memcom_torchrec.train.config import TrainConfig


@pytest.mark.slow
@pytest.mark.parametrize("method,scorer,dtype", [("memcom_qr", "tied", "int4"), ("memcom", "linear", "int8"),
                                                ("lowrank", "tied", "int4"), ("mixed_dim", "tied", "int8")])
def test_trainer_scores_what_the_program_scores(ml100k_dir: str, tmp_path, method: str, scorer: str, dtype: str):
    pytest.importorskip("executorch")
    from memcom_torchrec.experiment.pareto import measure_grid
    from memcom_torchrec.models.builder import load_trained_model
    from memcom_torchrec.modules.quant_grid import fake_quantize_rows

    run = str(tmp_path / "runs" / method)
    cfg = TrainConfig(data_dir=ml100k_dir, out_dir=run, model="next_item", method=method, compression_ratio=8.0,
                      scorer=scorer, use_user_id=scorer == "linear", history_len=5, embedding_dim=64, hidden=[64],
                      batch_size=256, epochs=1, max_steps=40, checkpoint_every=40, eval_batch_size=1024,
                      device="cpu", seed=1, qat=dtype)
    run_multiprocess(train_body, world_size=2, cfg=cfg)
    with open(os.path.join(run, "metrics.json")) as f:
        m = json.load(f)
    results = tmp_path / "results.csv"
    with open(results, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["method", "compression_ratio", "run_dir"])
        w.writeheader()
        w.writerow({"method": method, "compression_ratio": 8.0, "run_dir": run})
    point, = measure_grid(str(results), ml100k_dir, str(tmp_path / "pareto"), [dtype], batch_size=256, repeats=2)
    assert int(point["test_users"]) == m["test_users"] == 943
    assert abs(float(point["ndcg@k"]) - m["test_ndcg"]) < 1e-6, (point["ndcg@k"], m["test_ndcg"])
    # the checkpoint holds the float masters, not their grid values
    model, _ = load_trained_model(run)
    weights = {k: v for k, v in model.state_dict().items() if v.dim() == 2 and "embedding" in k}
    assert weights and all(not torch.allclose(fake_quantize_rows(v, dtype), v, atol=1e-7) for v in weights.values())


def test_qat_dtype_is_checked():
    with pytest.raises(ValueError, match=r"--qat 'int3': choose one of \['int8', 'int4', 'int4_row'\]"):
        TrainConfig(qat="int3")


def test_steps_accumulate_in_the_float_masters():
    """The straight-through estimator: a step's update of the grid value reaches the master, whole."""
    from memcom_torchrec.modules.quant_grid import fake_quantize_rows
    from memcom_torchrec.train.qat import QuantizationAwareTraining

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 8))
    qat = QuantizationAwareTraining(model, "int4")
    assert [name for name, _, _ in qat.targets] == ["0.weight"]  # biases stay float32, as exported
    master = model[0].weight.detach().clone()
    delta = 1e-4 * torch.randn_like(master)  # far below the int4 step: rounded away without masters
    with qat.on_grid():
        assert torch.equal(model[0].weight, fake_quantize_rows(master, "int4"))
        with torch.no_grad():
            model[0].weight += delta
    assert torch.allclose(model[0].weight, master + delta, atol=1e-7, rtol=0)
    with qat.on_grid():  # evaluation: no update, the master comes back unchanged
        pass
    assert torch.allclose(model[0].weight, master + delta, atol=1e-7, rtol=0)
