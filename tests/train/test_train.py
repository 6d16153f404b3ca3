"""End to end: each embedding method trains on real ML-100K and beats the popularity baseline."""

import json
import os

import pytest

from memcom_torchrec.eval.popularity import popularity_totals
from memcom_torchrec.train.trainer import TrainConfig, train
from dist_utils import run_multiprocess

pytestmark = pytest.mark.slow


def _train_body(rank: int, world_size: int, cfg: TrainConfig) -> None:
    train(cfg)


@pytest.mark.parametrize(
    "model,method,world_size,scorer,use_user_id",
    [("next_item", "uncompressed", 1, "", True), ("next_item", "hashing", 1, "", True), ("next_item", "qr", 1, "", True),
     ("next_item", "memcom", 2, "", True), ("next_item", "memcom_qr", 2, "", True),
     ("ranknet", "memcom", 2, "", True),
     # phone-shaped (no user id): the tied classifier and the paper's pair-scoring ranker
     ("next_item", "qr", 2, "tied", False), ("ranknet", "memcom", 1, "mlp", False),
     # a MEmCom-family variant (memcom_freq and memcom_clustered: the test below)
     ("next_item", "memcom_2hash", 2, "", True)],
)
def test_method_trains_and_beats_popularity(
    ml100k_dir: str, tmp_path, model: str, method: str, world_size: int, scorer: str, use_user_id: bool
) -> None:
    cfg = TrainConfig(
        data_dir=ml100k_dir, out_dir=str(tmp_path / method), model=model, method=method, compression_ratio=4.0,
        epochs=2 if model == "next_item" else 3, batch_size=512 // world_size, eval_batch_size=512, hidden=[128],
        scorer=scorer, use_user_id=use_user_id, warmup_epochs=1,
    )
    run_multiprocess(_train_body, world_size=world_size, cfg=cfg)
    with open(os.path.join(cfg.out_dir, "metrics.json")) as f:
        m = json.load(f)
    pop = popularity_totals(ml100k_dir)
    assert m["test_users"] == 943
    assert m["world_size"] == world_size
    assert m["k"] == 10 and m["test_ndcg"] > pop.mean_ndcg, (m["test_ndcg"], pop.mean_ndcg)
    if method != "uncompressed":
        assert m["table_compression_ratios"]["item"] >= 4.0
    assert os.path.exists(os.path.join(cfg.out_dir, "best", "LATEST"))


@pytest.mark.parametrize("method,scorer,use_user_id", [("memcom_freq", "tied", False), ("memcom_clustered", "", True)])
def test_stored_assignments_are_chosen_trained_and_saved(
    ml100k_dir: str, tmp_path, method: str, scorer: str, use_user_id: bool
) -> None:
    """On 2 ranks, each trains past popularity; memcom_freq's checkpoint holds the frequency cells,
    memcom_clustered's its clusters, which it started from (cluster_init, after its warm-up)."""
    import torch

    from memcom_torchrec.models.builder import load_trained_model
    from memcom_torchrec.train.assignment import frequency_cells

    cfg = TrainConfig(data_dir=ml100k_dir, out_dir=str(tmp_path / method), method=method, compression_ratio=4.0,
                      epochs=2, batch_size=256, hidden=[128], warmup_epochs=1, scorer=scorer,
                      use_user_id=use_user_id)
    run_multiprocess(_train_body, world_size=2, cfg=cfg)
    with open(os.path.join(cfg.out_dir, "metrics.json")) as f:
        m = json.load(f)
    assert m["test_ndcg"] > popularity_totals(ml100k_dir).mean_ndcg and m["world_size"] == 2
    model, _ = load_trained_model(cfg.out_dir)
    table = model.model.embeddings.embedding_bag_configs()[0]
    cells = model.model.embeddings.assignment("item").long()
    assert cells.dtype == torch.int64 and torch.unique(cells).numel() == table.num_embeddings
    if method == "memcom_freq":
        assert torch.equal(cells, frequency_cells(ml100k_dir, table))
    else:
        assert not torch.equal(cells, torch.arange(table.num_embeddings))  # not MEmCom's own cells
        assert int(torch.bincount(cells % table.num_buckets).max()) <= table.bucket_capacity
        start, _ = load_trained_model(os.path.join(cfg.out_dir, "cluster_init"))
        assert torch.equal(start.model.embeddings.assignment("item"), model.model.embeddings.assignment("item"))
        assert os.path.exists(os.path.join(cfg.out_dir, "warmup", "metrics.json"))
