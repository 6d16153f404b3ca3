"""Padding rows make batch sizes equal across ranks and change no loss or metric."""

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType

from memcom_torchrec.data import PAD_LABEL, Batch, pad_batch
from memcom_torchrec.models.next_item import NextItemClassifier, NextItemTrain
from torchrec import KeyedJaggedTensor


def _batch() -> Batch:
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["user_id", "history"], values=torch.tensor([0, 1, 2, 5, 6, 7]), lengths=torch.tensor([1, 1, 1, 2, 0, 1])
    )
    ex = KeyedJaggedTensor.from_lengths_sync(keys=["exclude"], values=torch.tensor([3, 4]), lengths=torch.tensor([1, 0, 1]))
    return Batch(sparse_features=kjt, labels=torch.tensor([1, 2, 3]), exclude=ex)


def test_pad_batch_appends_empty_rows() -> None:
    b = pad_batch(_batch(), 5)
    assert len(b) == 5 and b.labels.tolist() == [1, 2, 3, PAD_LABEL, PAD_LABEL]
    d = b.sparse_features.to_dict()
    assert d["history"].lengths().tolist() == [2, 0, 1, 0, 0]
    assert d["user_id"].lengths().tolist() == [1, 1, 1, 0, 0]
    assert d["history"].values().tolist() == [5, 6, 7]
    assert b.exclude.lengths().tolist() == [1, 0, 1, 0, 0]
    assert pad_batch(b, 5) is b


def test_padding_rows_do_not_change_the_loss() -> None:
    torch.manual_seed(0)
    tables = [
        EmbeddingBagConfig(name="item", num_embeddings=10, embedding_dim=4, feature_names=["history"], pooling=PoolingType.MEAN),
        EmbeddingBagConfig(name="user", num_embeddings=10, embedding_dim=4, feature_names=["user_id"]),
    ]
    model = NextItemTrain(NextItemClassifier(EmbeddingBagCollection(tables), 4, 10, hidden=[8]))
    loss, _ = model(_batch())
    padded, _ = model(pad_batch(_batch(), 8))
    torch.testing.assert_close(loss, padded)
    expected = nn.functional.cross_entropy(model.model(_batch().sparse_features), _batch().labels)
    torch.testing.assert_close(loss, expected)


def test_batches_without_the_user_feature() -> None:
    """Phone-shaped models read only the history: the reader drops ``user_id`` (and padding keeps it out)."""
    import pyarrow as pa

    from memcom_torchrec.data.reader import table_to_batch

    table = pa.table({"user": [3, 4], "item": [7, 8], "history": [[1, 2, 5], []]})
    with_user, without = table_to_batch(table), table_to_batch(table, with_user=False)
    assert with_user.sparse_features.keys() == ["user_id", "history"]
    assert without.sparse_features.keys() == ["history"]
    assert torch.equal(without.sparse_features["history"].values(), with_user.sparse_features["history"].values())
    assert torch.equal(without.sparse_features.lengths(), torch.tensor([3, 0], dtype=torch.int32))
    padded = pad_batch(without, 4)
    assert padded.sparse_features.keys() == ["history"] and padded.sparse_features.lengths().tolist() == [3, 0, 0, 0]
