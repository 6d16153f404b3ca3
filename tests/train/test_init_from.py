"""--init-from: a run starts from another run's weights (not its optimizer or training state)."""

import os
from dataclasses import replace

import pytest
import torch

from checkpoint_utils import checkpoint_tensors
from dist_utils import MultiProcessFailure, run_multiprocess, train_body
from memcom_torchrec.train.config import TrainConfig


@pytest.mark.slow
def test_a_run_starts_from_the_weights_of_another(ml100k_dir: str, tmp_path):
    first = TrainConfig(data_dir=ml100k_dir, out_dir=str(tmp_path / "first"), method="memcom_qr",
                        compression_ratio=8.0, scorer="tied", use_user_id=False, history_len=5, embedding_dim=16,
                        hidden=[32], batch_size=128, epochs=1, max_steps=8, checkpoint_every=8, eval_users=256,
                        device="cpu", seed=2)
    run_multiprocess(train_body, world_size=2, cfg=first)
    # learning rates 0: the second run's weights stay exactly where the first run left them
    second = replace(first, out_dir=str(tmp_path / "second"), init_from=first.out_dir, seed=5,
                     embedding_optimizer="sgd", embedding_lr=0.0, dense_lr=0.0)
    run_multiprocess(train_body, world_size=2, cfg=second)
    step = os.path.join("checkpoints", "step_00000008")
    a, b = (checkpoint_tensors(os.path.join(c.out_dir, step)) for c in (first, second))
    weights = [k for k in a if k.startswith("/model/")]
    assert any("item__q" in k for k in weights) and any("_entity_weights" in k for k in weights)
    for k in weights:
        assert torch.equal(a[k], b[k]), k
    # a run of another shape cannot start from it
    with pytest.raises(MultiProcessFailure, match=r"table"):
        run_multiprocess(train_body, world_size=2, cfg=replace(second, out_dir=str(tmp_path / "third"),
                                                               method="memcom"))
