"""The popularity baseline against a hand count on a log small enough to rank on paper."""

import csv
import math

import pytest
import torch

from memcom_torchrec.data import prepare_interactions
from memcom_torchrec.eval.popularity import item_counts, popularity_totals

# (user, item, time). Leave-one-out: each user's last item is test, the one before valid, the rest train.
LOG = [(1, 10, 1), (1, 20, 2), (1, 50, 3), (1, 30, 4), (1, 40, 5),
       (2, 10, 1), (2, 30, 2), (2, 60, 3), (2, 20, 4),
       (3, 20, 1), (3, 30, 2), (3, 10, 3), (3, 60, 4), (3, 40, 5)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("pop")
    with open(root / "log.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["u", "i", "t"])
        w.writerows(LOG)
    prepare_interactions(str(root / "log.csv"), "u", "i", "t", str(root / "data"), history_len=3)
    return str(root / "data")


def test_training_counts(tiny: str) -> None:
    # train rows: user 1: 10 20 50; user 2: 10 30; user 3: 20 30 10 (items 10..60 -> ids 0..5)
    assert item_counts(tiny).tolist() == [3, 2, 2, 0, 1, 0]


def test_test_split_by_hand(tiny: str) -> None:
    # Each user's candidates are the items not already seen; a tie ranks the target below (pessimistic).
    # user 1, target 40 (count 0), seen 10 20 50 30: candidates 40, 60 (0, a tie) -> rank 2
    # user 2, target 20 (count 2), seen 10 30 60:     candidates 20, 50 (1), 40 (0) -> rank 1
    # user 3, target 40 (count 0), seen 20 30 10 60:  candidates 40, 50 (1)         -> rank 2
    two = 1 / math.log2(3)
    t = popularity_totals(tiny, "test", k=2)
    assert t.count == 3 and t.hits == 3 and t.ndcg == pytest.approx(1 + 2 * two)
    t = popularity_totals(tiny, "test", k=1)
    assert t.hits == 1 and t.ndcg == pytest.approx(1.0)
    assert popularity_totals(tiny, "test", k=2, batch_size=1).ndcg == pytest.approx(1 + 2 * two)  # batching


def test_valid_split_by_hand(tiny: str) -> None:
    # user 1, target 30 (2), seen 10 20 50: 30, 40 (0), 60 (0)   -> rank 1
    # user 2, target 60 (0), seen 10 30: 20 (2), 50 (1) above, 40 (0) a tie -> rank 4
    # user 3, target 60 (0), seen 20 30 10: 50 (1) above, 40 (0) a tie      -> rank 3
    t = popularity_totals(tiny, "valid", k=10)
    assert t.count == 3 and t.hits == 3
    assert t.ndcg == pytest.approx(1 + 1 / math.log2(5) + 1 / math.log2(4))
    assert torch.isclose(torch.tensor(t.mean_ndcg), torch.tensor(t.ndcg / 3))
