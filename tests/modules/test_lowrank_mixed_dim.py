"""Low-rank and mixed-dimension tables: bad configs and bad input are named (the math: tests/models/test_scorers.py)."""

import pytest
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor

from memcom_torchrec.modules.lowrank_configs import LowRankEmbeddingBagConfig
from memcom_torchrec.modules.lowrank_embedding_modules import LowRankEmbeddingBagCollection
from memcom_torchrec.modules.mixed_dim_configs import MixedDimEmbeddingBagConfig, frequency_slots
from memcom_torchrec.modules.mixed_dim_embedding_modules import MixedDimEmbeddingBagCollection

COMMON = dict(name="item", num_embeddings=50, embedding_dim=16, feature_names=["history"])
USER = EmbeddingBagConfig(name="user", num_embeddings=7, embedding_dim=16, feature_names=["user_id"])


def kjt(history, user=(1, 2)) -> KeyedJaggedTensor:
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["history", "user_id"], values=torch.tensor(list(history) + list(user)),
        lengths=torch.tensor([len(history) - 1, 1, 1, 1]))


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match=r"low-rank table 'item': compression_ratio 5 is unreachable .* at most 3\.03"):
        LowRankEmbeddingBagConfig(compression_ratio=5.0, **COMMON)
    with pytest.raises(ValueError, match=r"rank must be a multiple of 4 in \(0, embedding_dim=16\), got 6"):
        LowRankEmbeddingBagConfig(rank=6, **COMMON)
    with pytest.raises(ValueError, match=r"mixed-dimension table 'item': compression_ratio 4 is unreachable .* at most"):
        MixedDimEmbeddingBagConfig(compression_ratio=4.0, **COMMON)
    with pytest.raises(ValueError, match=r"head_rows must be in \[1, num_embeddings=50\), got 50"):
        MixedDimEmbeddingBagConfig(head_rows=50, tail_dim=4, **COMMON)
    with pytest.raises(ValueError, match=r"give head_rows and tail_dim, or compression_ratio, not both"):
        MixedDimEmbeddingBagConfig(head_rows=5, tail_dim=4, compression_ratio=2.0, **COMMON)


@pytest.mark.parametrize("collection,config", [
    (LowRankEmbeddingBagCollection, LowRankEmbeddingBagConfig(rank=4, **COMMON)),
    (MixedDimEmbeddingBagCollection, MixedDimEmbeddingBagConfig(head_rows=5, tail_dim=4, **COMMON)),
], ids=["lowrank", "mixed_dim"])
def test_bad_input_is_named(collection, config):
    ebc = collection([config, USER])
    assert ebc(kjt([3, 4, 49])).to_dict()["history"].shape == (2, 16)
    with pytest.raises(ValueError, match=r"feature 'history': id 50 is out of range for table 'item' \(num_embeddings=50\)"):
        ebc(kjt([3, 4, 50]))
    with pytest.raises(ValueError, match=r"feature 'history': negative id -1 for table 'item'"):
        ebc(kjt([3, -1, 5]))
    unknown = KeyedJaggedTensor.from_lengths_sync(keys=["clicks"], values=torch.tensor([1]), lengths=torch.tensor([1]))
    with pytest.raises(ValueError, match="'clicks'"):
        ebc(unknown)


def test_mixed_dim_slots_are_a_permutation_by_frequency():
    ebc = MixedDimEmbeddingBagCollection([MixedDimEmbeddingBagConfig(head_rows=5, tail_dim=4, **COMMON)])
    with pytest.raises(ValueError, match=r"table 'item': slots must be a permutation of \[0, 50\) \(some slot is repeated"):
        ebc.set_assignment("item", torch.zeros(50, dtype=torch.long))
    with pytest.raises(ValueError, match=r"table 'item': slots must be a permutation of \[0, 50\), got shape \(49,\)"):
        ebc.set_assignment("item", torch.arange(49))
    with pytest.raises(ValueError, match="table 'user' is not a mixed-dimension table"):
        ebc.set_assignment("user", torch.arange(7))
    counts = torch.tensor([3, 9, 9, 0, 5])
    assert frequency_slots(counts).tolist() == [3, 0, 1, 4, 2]  # most frequent first, ties by id
