"""Popularity baseline: every user gets the items ranked by training-set frequency."""

import numpy as np
import pyarrow.parquet as pq
import torch

from memcom_torchrec.data.manifest import ITEM, USER, read_manifest, split_files
from memcom_torchrec.data.reader import InteractionBatchReader
from memcom_torchrec.eval.metrics import RankingTotals, rank_batches


def item_counts(data_dir: str, column: str = ITEM) -> torch.Tensor:
    """Training interactions per item (``num_items`` float64), or per user with ``column=USER``."""
    manifest = read_manifest(data_dir)
    counts = np.zeros(int(manifest["num_users" if column == USER else "num_items"]), dtype=np.float64)
    for f in split_files(data_dir, manifest, "train"):
        ids = pq.read_table(f["path"], columns=[column]).column(column).to_numpy()
        counts += np.bincount(ids, minlength=counts.size)
    return torch.from_numpy(counts)


def popularity_totals(data_dir: str, split: str = "test", k: int = 10, batch_size: int = 1024) -> RankingTotals:
    """nDCG@k / HR@k of the popularity ranker, with the same protocol as the models.

    Args:
        data_dir (str): prepared dataset.
        split (str): ``valid`` or ``test``.
        k (int): cut-off.
        batch_size (int): users scored at once.

    Returns:
        RankingTotals: sums over the split's users.
    """
    counts = item_counts(data_dir).float()
    return rank_batches(((counts.unsqueeze(0).expand(len(b), -1), b.labels, b.exclude.lengths(), b.exclude.values())
                         for b in InteractionBatchReader(data_dir, split, batch_size)), k)
