"""End to end on real ML-100K: the shared run reaches a measured level; each method's short run learns.

The shared run (``conftest.ml100k_run``: the main job's settings, MEmCom 16x on 2 ranks) is held to
the level such runs reach (0.06-0.07 nDCG@10 measured; the bar 0.05, twice popularity's ~0.025).
The short runs (2-3 epochs, each method and model shape) must lower their training loss from the
first epoch to the last, and rank every test user.
"""

import json
import os

import pytest

from memcom_torchrec.eval.popularity import popularity_totals
from memcom_torchrec.train.trainer import TrainConfig
from dist_utils import run_multiprocess, train_body

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "model,method,world_size,scorer,use_user_id",
    [("next_item", "uncompressed", 1, "", True), ("next_item", "hashing", 1, "", True), ("next_item", "qr", 1, "", True),
     ("next_item", "memcom", 2, "", True), ("next_item", "memcom_qr", 2, "", True),
     ("ranknet", "memcom", 2, "", True),
     # phone-shaped (no user id): the tied classifier and the paper's pair-scoring ranker
     ("next_item", "qr", 2, "tied", False), ("ranknet", "memcom", 1, "mlp", False),
     # a MEmCom-family variant (memcom_freq and memcom_clustered: the test below)
     ("next_item", "memcom_2hash", 2, "", True),
     # low-rank: FBGEMM rows sharded inside, a dense projection (TorchRec's traced pipeline, and the tied model)
     ("next_item", "lowrank", 2, "", True), ("next_item", "lowrank", 2, "tied", False),
     # mixed-dimension: slots by training frequency, the inner collection's input computed (plain pipeline)
     ("next_item", "mixed_dim", 2, "", True), ("next_item", "mixed_dim", 2, "tied", False)],
)
def test_method_short_run_lowers_its_training_loss(
    ml100k_dir: str, tmp_path, model: str, method: str, world_size: int, scorer: str, use_user_id: bool
) -> None:
    cfg = TrainConfig(
        data_dir=ml100k_dir, out_dir=str(tmp_path / method), model=model, method=method, compression_ratio=4.0,
        epochs=2 if model == "next_item" else 3, batch_size=512 // world_size, eval_batch_size=512, hidden=[128],
        scorer=scorer, use_user_id=use_user_id, warmup_epochs=1,
    )
    run_multiprocess(train_body, world_size=world_size, cfg=cfg)
    with open(os.path.join(cfg.out_dir, "metrics.json")) as f:
        m = json.load(f)
    assert m["test_users"] == 943
    assert m["world_size"] == world_size and m["k"] == 10
    losses = [v["loss"] for v in m["valid_curve"]]
    assert len(losses) >= 2 and losses[-1] < losses[0], losses
    if method != "uncompressed":
        assert m["table_compression_ratios"]["item"] >= 4.0
    assert os.path.exists(os.path.join(cfg.out_dir, "best", "LATEST"))


@pytest.mark.parametrize("method,scorer,use_user_id", [("memcom_freq", "tied", False), ("memcom_clustered", "", True)])
def test_stored_assignments_are_chosen_trained_and_saved(
    ml100k_dir: str, tmp_path, method: str, scorer: str, use_user_id: bool
) -> None:
    """On 2 ranks, each lowers its training loss; memcom_freq's checkpoint holds the frequency cells,
    memcom_clustered's its clusters, which it started from (cluster_init, after its warm-up)."""
    import torch

    from memcom_torchrec.models.builder import load_trained_model
    from memcom_torchrec.train.assignment import frequency_cells

    cfg = TrainConfig(data_dir=ml100k_dir, out_dir=str(tmp_path / method), method=method, compression_ratio=4.0,
                      epochs=2, batch_size=256, hidden=[128], warmup_epochs=1, scorer=scorer,
                      use_user_id=use_user_id)
    run_multiprocess(train_body, world_size=2, cfg=cfg)
    with open(os.path.join(cfg.out_dir, "metrics.json")) as f:
        m = json.load(f)
    losses = [v["loss"] for v in m["valid_curve"]]
    assert m["world_size"] == 2 and losses[-1] < losses[0], losses
    model, _ = load_trained_model(cfg.out_dir)
    table = model.model.embeddings.embedding_bag_configs()[0]
    cells = model.model.embeddings.assignment("item").long()
    assert cells.dtype == torch.int64 and torch.unique(cells).numel() == table.num_embeddings
    if method == "memcom_freq":
        assert torch.equal(cells, frequency_cells(ml100k_dir, table))
    else:
        assert not torch.equal(cells, torch.arange(table.num_embeddings))  # not MEmCom's own cells
        assert int(torch.bincount(cells % table.num_buckets).max()) <= table.hash_columns
        start, _ = load_trained_model(os.path.join(cfg.out_dir, "cluster_init"))
        assert torch.equal(start.model.embeddings.assignment("item"), model.model.embeddings.assignment("item"))
        assert os.path.exists(os.path.join(cfg.out_dir, "warmup", "metrics.json"))


def test_shared_run_reaches_the_measured_level(ml100k_run: str, ml100k_dir: str) -> None:
    """The main job's settings on 2 ranks: test nDCG@10 >= 0.05 (0.06-0.07 measured), twice popularity's."""
    with open(os.path.join(ml100k_run, "metrics.json")) as f:
        m = json.load(f)
    pop = popularity_totals(ml100k_dir).mean_ndcg
    assert m["test_users"] == 943 and m["k"] == 10 and m["world_size"] == 2
    assert m["test_ndcg"] >= 0.05 and m["test_ndcg"] > 2 * pop, (m["test_ndcg"], pop)
    assert m["table_compression_ratios"]["item"] >= 16.0
