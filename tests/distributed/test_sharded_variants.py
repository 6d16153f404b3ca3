"""The MEmCom-family variants sharded (TW, RW) against their unsharded twins on 2-process gloo runs.

A second hash (``memcom_2hash``) and stored assignments (``memcom_freq``,
``memcom_clustered``) change which rows of ``U`` and cells of ``w`` an id reads;
the sharded module maps ids before the all-to-all and must give the same pooled
outputs and the same updates of ``U`` and ``w`` as the unsharded collection. The
DCP round trip saves the stored assignment with the tables and refuses a
checkpoint whose assignment does not fit the config.
"""

from typing import Dict, List

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec import EmbeddingBagConfig, PoolingType
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.types import ShardingType

from memcom_torchrec import MEmComEmbeddingBagCollection, MEmComEmbeddingBagCollectionSharder, MEmComEmbeddingBagConfig
from memcom_torchrec.distributed.state_dict_utils import gather_unsharded_state_dict, load_unsharded_state_dict
from memcom_torchrec.models.checkpoint import load_checkpoint, save_checkpoint
from dist_utils import assert_sharded_steps_match, run_multiprocess, shard_with_planner
from reference import in_key_order, rank_batches

pytestmark = pytest.mark.slow

KEYS = ["hist", "target", "user", "cat"]
SIZES = {"hist": 101, "target": 101, "user": 12, "cat": 30}
OPT = {"sgd": EmbOptimType.EXACT_SGD, "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD}
VARIANTS: Dict[str, Dict[str, object]] = {
    "2hash": dict(num_hashes=2),
    "frequency": dict(assignment="frequency", head_fraction=0.3),
    "clustered": dict(assignment="clustered"),
    "clustered_2hash": dict(assignment="clustered", num_hashes=2),
}


def make_tables(variant: str) -> List[EmbeddingBagConfig]:
    options = VARIANTS[variant]
    return [
        MEmComEmbeddingBagConfig(
            name="item", num_embeddings=101, embedding_dim=8, feature_names=["hist", "target"], num_buckets=10, **options
        ),
        EmbeddingBagConfig(name="user", num_embeddings=12, embedding_dim=8, feature_names=["user"]),
        MEmComEmbeddingBagConfig(
            name="cat", num_embeddings=30, embedding_dim=4, feature_names=["cat"], num_buckets=5,
            pooling=PoolingType.MEAN, **options
        ),
    ]


def random_cells(config: MEmComEmbeddingBagConfig, seed: int) -> torch.Tensor:
    """A one-to-one entity -> cell map into the whole grid (padding cells anywhere)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(config.assignment_cells, generator=g)[: config.num_embeddings]


def make_reference(variant: str, seed: int = 0) -> MEmComEmbeddingBagCollection:
    torch.manual_seed(seed)
    tables = make_tables(variant)
    ref = MEmComEmbeddingBagCollection(tables)
    with torch.no_grad():
        for p in ref._entity_weights.values():
            p.uniform_(0.5, 1.5)
    for i, t in enumerate(tables):
        if isinstance(t, MEmComEmbeddingBagConfig) and t.stores_assignment:
            ref.set_assignment(t.name, random_cells(t, seed + i))
    return ref


def shard(variant: str, sharding_type: str, optimizer: str, lr: float) -> DistributedModelParallel:
    model = MEmComEmbeddingBagCollection(make_tables(variant), device=torch.device("meta"))
    sharder = MEmComEmbeddingBagCollectionSharder(fused_params={"optimizer": OPT[optimizer], "learning_rate": lr})
    return shard_with_planner(model, [sharder], {t.name: sharding_type for t in make_tables(variant)})


def batches(step: int, world_size: int, batch: int = 4):
    return rank_batches(step, world_size, KEYS, SIZES, 8 + 8 + 8 + 4, batch)


def _compare_body(rank: int, world_size: int, variant: str, sharding_type: str, optimizer: str, steps: int) -> None:
    lr = 0.1
    ref = make_reference(variant)
    dmp = shard(variant, sharding_type, optimizer, lr)
    load_unsharded_state_dict(dmp, ref.state_dict())
    for t in make_tables(variant):
        if isinstance(t, MEmComEmbeddingBagConfig) and t.stores_assignment:
            assert torch.equal(dmp.module.assignment(t.name).long(), ref.assignment(t.name).long())
    assert_sharded_steps_match(dmp, ref, optimizer, lr, steps, batches, KEYS)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("sharding_type", [ShardingType.TABLE_WISE.value, ShardingType.ROW_WISE.value])
def test_sharded_variant_matches_unsharded(variant: str, sharding_type: str) -> None:
    # Row-wise Adagrad over two steps: outputs, then U and w (and so their gradients) after each update.
    run_multiprocess(
        _compare_body, world_size=2, variant=variant, sharding_type=sharding_type, optimizer="rowwise_adagrad", steps=2
    )


def test_sharded_variant_sgd_step_matches_unsharded() -> None:
    # One SGD step: (before - after) / lr is the gradient, so this checks the gradients of U and w exactly.
    run_multiprocess(_compare_body, world_size=2, variant="clustered_2hash", sharding_type=ShardingType.ROW_WISE.value,
                     optimizer="sgd", steps=1)


def _dcp_body(rank: int, world_size: int, variant: str, root: str) -> None:
    ref = make_reference(variant, seed=3)
    saver = shard(variant, ShardingType.ROW_WISE.value, "rowwise_adagrad", 0.1)
    load_unsharded_state_dict(saver, ref.state_dict())
    path = save_checkpoint(root, 1, saver)
    # into a differently sharded model (TW) whose assignment is still MEmCom's default
    loader = shard(variant, ShardingType.TABLE_WISE.value, "rowwise_adagrad", 0.1)
    load_checkpoint(path, loader)
    got = gather_unsharded_state_dict(loader, dst=None)
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(got[name], value, msg=lambda m: f"{name}: {m}")
    data = batches(0, world_size)
    expected = in_key_order(ref(data[rank][0]), KEYS)
    torch.testing.assert_close(in_key_order(loader(data[rank][0]).wait(), KEYS), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["frequency", "clustered"])
def test_dcp_round_trip_keeps_the_assignment(variant: str, tmp_path) -> None:
    root = str(tmp_path / "ckpt")
    run_multiprocess(_dcp_body, world_size=2, variant=variant, root=root)
    # the 2-rank checkpoint into the unsharded model, in this process
    ref = make_reference(variant, seed=3)
    unsharded = MEmComEmbeddingBagCollection(make_tables(variant))
    load_checkpoint(root, unsharded)
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(unsharded.state_dict()[name], value, msg=lambda m: f"{name}: {m}")
    assert unsharded.assignment("item").dtype == torch.int16


def test_checkpoint_with_another_assignment_is_refused(tmp_path) -> None:
    saved = make_reference("clustered")
    path = save_checkpoint(str(tmp_path / "ckpt"), 1, saved)
    # the same table shape with another assignment kind: the table signatures differ
    other = MEmComEmbeddingBagCollection(make_tables("frequency"))
    with pytest.raises(ValueError, match=r"table '(cat|item)' differs.*'assignment': \('clustered', 'frequency'\)"):
        load_checkpoint(path, other)
    # a signature that matches, but an assignment that does not fit its grid
    bad = make_reference("clustered")
    state = bad.state_dict()
    state["_assignments.item"] = torch.zeros_like(state["_assignments.item"])
    with pytest.raises(ValueError, match=r"_assignments.item: MEmCom table 'item' .*two entities in one cell"):
        bad.load_state_dict(state)
