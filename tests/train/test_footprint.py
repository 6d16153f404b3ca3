"""The trainer's embedding footprint: parameters, bytes and ratios summed from table_memory."""

import pytest
from torchrec import EmbeddingBagConfig

from memcom_torchrec import MEmComEmbeddingBagConfig
from memcom_torchrec.train.trainer import embedding_footprint


def test_compression_accounting_is_exact() -> None:
    n_items, n_users, d = 3706, 6040, 64
    memcom = MEmComEmbeddingBagConfig(name="item", num_embeddings=n_items, embedding_dim=d, feature_names=["history"],
                                      compression_ratio=16)
    user = EmbeddingBagConfig(name="user", num_embeddings=n_users, embedding_dim=d, feature_names=["user_id"])
    fp = embedding_footprint([memcom, user], "rowwise_adagrad")
    m = memcom.num_buckets
    assert fp["embedding_params"] == m * d + n_items + n_users * d
    assert fp["compression_ratio"] == pytest.approx((n_items + n_users) * d / (m * d + n_items + n_users * d))
    assert fp["table_compression_ratios"]["item"] == pytest.approx(n_items * d / (m * d + n_items))
    assert fp["table_compression_ratios"]["item"] >= 16
    q = -(-n_items // m)
    assert fp["embedding_bytes"] == 4 * (m * d + m * q + n_users * d)
