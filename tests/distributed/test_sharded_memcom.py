"""ShardedMEmComEmbeddingBagCollection against its unsharded twin on 2-process gloo runs."""

import os
from typing import List, Optional

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec import EmbeddingBagConfig, PoolingType
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.types import ShardingType

from memcom_torchrec import MEmComEmbeddingBagCollection, MEmComEmbeddingBagCollectionSharder, MEmComEmbeddingBagConfig
from memcom_torchrec.distributed.memcom_embeddingbag import GATHERED, WEIGHTED_TBE
from memcom_torchrec.distributed.state_dict_utils import load_unsharded_state_dict
from memcom_torchrec.optim import fused_step
from memcom_torchrec.optim.fused_step import ATEN, COMPILED
from dist_utils import assert_sharded_steps_match, require_kernel, run_multiprocess, shard_with_planner
from reference import rank_batches

pytestmark = pytest.mark.slow

KEYS = ["hist", "target", "user", "cat"]
SIZES = {"hist": 101, "target": 101, "user": 12, "cat": 30}
OPT = {"sgd": EmbOptimType.EXACT_SGD, "adagrad": EmbOptimType.EXACT_ADAGRAD, "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD}


def make_tables() -> List[EmbeddingBagConfig]:
    return [
        MEmComEmbeddingBagConfig(
            name="item", num_embeddings=101, embedding_dim=8, feature_names=["hist", "target"], num_buckets=10
        ),
        EmbeddingBagConfig(name="user", num_embeddings=12, embedding_dim=8, feature_names=["user"]),
        MEmComEmbeddingBagConfig(
            name="cat", num_embeddings=30, embedding_dim=4, feature_names=["cat"], num_buckets=5, pooling=PoolingType.MEAN
        ),
    ]


def make_reference(seed: int = 0) -> MEmComEmbeddingBagCollection:
    torch.manual_seed(seed)
    ref = MEmComEmbeddingBagCollection(make_tables())
    with torch.no_grad():
        for p in ref._entity_weights.values():
            p.uniform_(0.5, 1.5)
    return ref


def shard(
    world_size: int,
    sharding_type: str,
    optimizer: str,
    lr: float,
    local_world_size: Optional[int] = None,
    lookup_path: str = "auto",
) -> DistributedModelParallel:
    """Plans and shards the test collection; ``local_world_size`` < ``world_size`` simulates several nodes."""
    model = MEmComEmbeddingBagCollection(make_tables(), device=torch.device("meta"))
    sharder = MEmComEmbeddingBagCollectionSharder(
        fused_params={"optimizer": OPT[optimizer], "learning_rate": lr}, lookup_path=lookup_path
    )
    return shard_with_planner(model, [sharder], {t.name: sharding_type for t in make_tables()}, local_world_size)


def batches(step: int, world_size: int, batch: int = 4):
    return rank_batches(step, world_size, KEYS, SIZES, 8 + 8 + 8 + 4, batch)


def _compare_body(
    rank: int,
    world_size: int,
    sharding_type: str,
    optimizer: str,
    steps: int,
    local_world_size: Optional[int] = None,
    lookup_path: str = "auto",
    kernel: Optional[str] = None,
) -> None:
    lr = 0.1
    fused_step.set_kernel(kernel)  # the gathered path's w step: compiled op or ATen fallback (None: default)
    ref = make_reference()
    if local_world_size is not None:  # TorchRec's TWRW groups ranks into nodes by LOCAL_WORLD_SIZE
        os.environ["LOCAL_WORLD_SIZE"] = str(local_world_size)
    dmp = shard(world_size, sharding_type, optimizer, lr, local_world_size, lookup_path)
    expected_path = GATHERED if lookup_path == "auto" else lookup_path  # CPU: auto is the gathered path
    assert dmp.module._lookup_path == expected_path
    load_unsharded_state_dict(dmp, ref.state_dict())
    assert_sharded_steps_match(dmp, ref, optimizer, lr, steps, batches, KEYS)


@pytest.mark.parametrize("lookup_path", ["auto", WEIGHTED_TBE])
@pytest.mark.parametrize("sharding_type", [ShardingType.TABLE_WISE.value, ShardingType.ROW_WISE.value])
def test_sharded_matches_unsharded_sgd(sharding_type: str, lookup_path: str) -> None:
    # One SGD step: (before - after) / lr is the gradient, so this checks the gradients of U and w.
    run_multiprocess(
        _compare_body, world_size=2, sharding_type=sharding_type, optimizer="sgd", steps=1, lookup_path=lookup_path
    )


# The gathered path with each implementation of w's step, and FBGEMM's own w gradient.
PATHS = [(GATHERED, COMPILED), (GATHERED, ATEN), (WEIGHTED_TBE, None)]


@pytest.mark.parametrize("lookup_path,kernel", PATHS, ids=["gathered-compiled", "gathered-aten", "weighted_tbe"])
@pytest.mark.parametrize("sharding_type", [ShardingType.TABLE_WISE.value, ShardingType.ROW_WISE.value])
@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "rowwise_adagrad"])
def test_sharded_matches_unsharded_several_steps(
    sharding_type: str, optimizer: str, lookup_path: str, kernel: Optional[str]
) -> None:
    require_kernel(kernel)
    run_multiprocess(
        _compare_body, world_size=2, sharding_type=sharding_type, optimizer=optimizer, steps=3,
        lookup_path=lookup_path, kernel=kernel,
    )


def _assert_table_row_wise_over_nodes(dmp: DistributedModelParallel, world_size: int, local_world_size: int) -> None:
    """Each table's rows sit on the ranks of one node only, split across that node's ranks."""
    for table, ps in dmp.plan.plan[""].items():
        ranks = sorted(ps.ranks)
        assert ps.sharding_type == ShardingType.TABLE_ROW_WISE.value and len(ranks) == local_world_size, (table, ranks)
        assert len({r // local_world_size for r in ranks}) == 1, f"table {table} spans nodes: {ranks}"


def _twrw_body(rank: int, world_size: int, optimizer: str, steps: int) -> None:
    os.environ["LOCAL_WORLD_SIZE"] = "2"
    _assert_table_row_wise_over_nodes(shard(world_size, ShardingType.TABLE_ROW_WISE.value, optimizer, 0.1, 2), world_size, 2)
    _compare_body(rank, world_size, ShardingType.TABLE_ROW_WISE.value, optimizer, steps, local_world_size=2)


@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
def test_table_row_wise_over_two_nodes_matches_unsharded(optimizer: str) -> None:
    # 2 nodes x 2 ranks: TWRW places each table on one node and splits its rows over that node's
    # ranks. On one node (Topology's default local_world_size = world_size) it would be row-wise.
    run_multiprocess(_twrw_body, world_size=4, optimizer=optimizer, steps=3)


def test_world_of_one_fused_step_matches_reference() -> None:
    run_multiprocess(_compare_body, world_size=1, sharding_type=ShardingType.ROW_WISE.value, optimizer="rowwise_adagrad", steps=2)
