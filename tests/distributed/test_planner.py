"""The planner sizes MEmCom tables by U, w and their optimizer state; plans become sharded modules."""

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec.distributed.planner import Topology
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.shard_estimators import EmbeddingStorageEstimator
from torchrec.distributed.types import ShardingType

from memcom_torchrec import MEmComEmbeddingBagCollection, MEmComEmbeddingBagCollectionSharder, MEmComEmbeddingBagConfig
from memcom_torchrec.distributed.memcom_embeddingbag import GATHERED, WEIGHTED_TBE, resolve_lookup_path
from torchrec import EmbeddingBagConfig


def _storage(tables, sharding_type: str) -> int:
    topology = Topology(world_size=2, compute_device="cpu")
    enumerator = EmbeddingEnumerator(topology=topology, batch_size=512,
                                     estimator=[EmbeddingStorageEstimator(topology=topology)])
    module = MEmComEmbeddingBagCollection(tables, device=torch.device("meta"))
    sharder = MEmComEmbeddingBagCollectionSharder(fused_params={"optimizer": EmbOptimType.EXACT_SGD})
    options = [o for o in enumerator.enumerate(module, [sharder]) if o.sharding_type == sharding_type]
    assert options, f"no {sharding_type} option"
    return sum(s.storage.ddr for s in options[0].shards)


def test_planner_counts_entity_weights() -> None:
    n, d = 100_000, 64
    memcom = MEmComEmbeddingBagConfig(name="t", num_embeddings=n, embedding_dim=d, feature_names=["f"], compression_ratio=16)
    m, q = memcom.entity_weight_shape
    u_only = EmbeddingBagConfig(name="t", num_embeddings=m, embedding_dim=d, feature_names=["f"])
    for st in (ShardingType.TABLE_WISE.value, ShardingType.ROW_WISE.value):
        with_w, without_w = _storage([memcom], st), _storage([u_only], st)
        # The difference is w's grid (m x Q float32), plus a known over-estimate: the planner
        # sizes the pooled-output buffers (forward and backward) by the sized tensor's width d + Q.
        # (batch 512, so the excess is a whole number of 512 x Q float32 buffers).
        excess = with_w - without_w - m * q * 4
        assert excess >= 0 and excess % (512 * q * 4) == 0, (st, with_w - without_w, m * q * 4)


def test_sharder_offers_only_types_that_keep_w_with_u() -> None:
    sharder = MEmComEmbeddingBagCollectionSharder()
    for device in ("cpu", "cuda"):
        assert set(sharder.sharding_types(device)) == {"table_wise", "row_wise", "table_row_wise"}
        assert "fused" in sharder.compute_kernels("row_wise", device)


def test_lookup_path_is_chosen_per_device_and_checked() -> None:
    assert resolve_lookup_path("auto", torch.device("cpu")) == GATHERED
    assert resolve_lookup_path("auto", torch.device("cuda")) == WEIGHTED_TBE
    assert resolve_lookup_path(WEIGHTED_TBE, torch.device("cpu")) == WEIGHTED_TBE
    with pytest.raises(ValueError, match=r"unknown MEmCom lookup_path 'fast'; use one of \['auto', 'weighted_tbe', 'gathered'\]"):
        MEmComEmbeddingBagCollectionSharder(lookup_path="fast")
