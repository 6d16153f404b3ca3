"""The method registry: every method builds its tables, reaches its ratio, names what it cannot reach."""

import math

import pytest
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType

from memcom_torchrec.models.embeddings import EmbeddingMethodConfig, build_collection, table_configs
from memcom_torchrec.modules import MEmComEmbeddingBagCollection, QREmbeddingBagCollection
from memcom_torchrec.modules.lowrank_embedding_modules import LowRankEmbeddingBagCollection
from memcom_torchrec.modules.mixed_dim_embedding_modules import MixedDimEmbeddingBagCollection
from memcom_torchrec.modules.memory import table_memory
from memcom_torchrec.modules.methods import (
    EmbeddingMethod,
    TableSpec,
    collection_class_for,
    get_method,
    method_names,
    method_sharders,
    register_method,
)

N, D = 3706, 64
ITEM = TableSpec("item", N, ["history"], PoolingType.MEAN)
USER = TableSpec("user", 6040, ["user_id"])
COLLECTIONS = {
    "uncompressed": EmbeddingBagCollection,
    "hashing": MEmComEmbeddingBagCollection,
    "memcom": MEmComEmbeddingBagCollection,
    "qr": QREmbeddingBagCollection,
    "memcom_qr": QREmbeddingBagCollection,
    "memcom_2hash": MEmComEmbeddingBagCollection,
    "memcom_freq": MEmComEmbeddingBagCollection,
    "memcom_clustered": MEmComEmbeddingBagCollection,
    "memcom_clustered_2hash": MEmComEmbeddingBagCollection,
    "lowrank": LowRankEmbeddingBagCollection,
    "mixed_dim": MixedDimEmbeddingBagCollection,
}


def test_registered_methods() -> None:
    assert method_names() == list(COLLECTIONS)
    with pytest.raises(ValueError, match=r"unknown embedding method 'memcom_double'; choose one of \['uncompressed'"):
        get_method("memcom_double")
    with pytest.raises(ValueError, match="'memcom' is already registered"):
        register_method(get_method("memcom"))


@pytest.mark.parametrize("name", list(COLLECTIONS))
@pytest.mark.parametrize("ratio", [2.0, 4.0, 16.0])
def test_each_method_reaches_its_ratio(name: str, ratio: float) -> None:
    method = get_method(name)
    if method.unreachable(N, D, ratio) is not None:  # 4-wide rows top out at 15.7x (lowrank), 14.0x (mixed_dim)
        best = {"lowrank": 15.73, "mixed_dim": 13.96}
        assert ratio == 16.0 and method.max_compression_ratio(N, D) == pytest.approx(best[name], 1e-3)
        return
    tables = table_configs([ITEM, USER], EmbeddingMethodConfig(name, ratio if method.compresses else 1.0, ("item",), D))
    item, user = tables
    assert type(user) is EmbeddingBagConfig  # not compressed: not in compressed_tables
    assert item.feature_names == ["history"] and item.pooling == PoolingType.MEAN
    mem = table_memory(item)
    if method.compresses:
        assert mem.compression_ratio >= ratio
        # the largest table within the budget: one more row (QR: the next p down) would miss it
        assert mem.compression_ratio < 2 * ratio
    else:
        assert mem.compression_ratio == 1.0
    assert isinstance(build_collection(tables, device="meta"), COLLECTIONS[name])


@pytest.mark.parametrize("name", list(COLLECTIONS))
def test_each_method_names_the_sharder_of_its_collection(name: str) -> None:
    method = get_method(name)
    # the collection, or the child that DistributedModelParallel shards (lowrank: its inner MEmCom collection)
    collection = collection_class_for([method.table_config(ITEM, D, 4.0)])(
        tables=[method.table_config(ITEM, D, 4.0)], device="meta")
    assert any(type(m) is method.sharder_class()().module_type for m in collection.modules())
    assert type(method.make_config(ITEM, D, 4.0)) is method.config_type()


def test_one_sharder_per_sharded_twin() -> None:
    sharders = method_sharders({"learning_rate": 0.1})
    assert [s.module_type for s in sharders] == [EmbeddingBagCollection, MEmComEmbeddingBagCollection,
                                                 QREmbeddingBagCollection]
    assert all(s.fused_params["learning_rate"] == 0.1 for s in sharders)



@pytest.mark.parametrize("name", ["hashing", "memcom", "qr", "memcom_qr", "memcom_2hash", "memcom_freq", "memcom_clustered",
                                  "memcom_clustered_2hash"])
def test_max_ratio_is_reachable_and_beyond_it_is_named(name: str) -> None:
    method = get_method(name)
    best = method.max_compression_ratio(N, D)
    # just below the maximum builds a table that meets it
    at = method.table_config(ITEM, D, best * (1 - 1e-9))
    assert table_memory(at).compression_ratio >= best * (1 - 1e-9)
    with pytest.raises(ValueError, match=rf"table 'item': compression_ratio .* is unreachable with method '{name}'"):
        method.table_config(ITEM, D, best * 1.01)
    assert method.unreachable(N, D, best * 1.01) is not None and method.unreachable(N, D, 2.0) is None


def test_max_ratios_match_the_formulas() -> None:
    assert get_method("memcom").max_compression_ratio(N, D) == pytest.approx(N * D / (D + N))
    assert get_method("hashing").max_compression_ratio(N, D) == N
    rows = min(math.ceil(N / p) + p for p in range(1, N + 1))  # QR's fewest rows, by brute force
    assert get_method("qr").max_compression_ratio(N, D) == pytest.approx(N / rows)
    assert get_method("memcom_qr").max_compression_ratio(N, D) == pytest.approx(N * D / (rows * D + N))
    assert get_method("uncompressed").unreachable(N, D, 40.0) is None
    # the variants count what they store: one row of U, the w grid, a stored assignment (int16 here)
    assert get_method("memcom_2hash").max_compression_ratio(N, D) == pytest.approx(N * D / (D + 2 * N))
    assert get_method("memcom_clustered").max_compression_ratio(N, D) == pytest.approx(N * D / (D + N + N / 2))
    # a frequency table's smallest is two rows of U (a quarter of 2 rows is no head row: N cells in all)
    assert get_method("memcom_freq").max_compression_ratio(N, D) == pytest.approx(N * D / (2 * D + N + N / 2))


def test_bad_configs_are_named() -> None:
    with pytest.raises(ValueError, match="method 'memcom' needs compression_ratio > 1, got 1.0"):
        EmbeddingMethodConfig("memcom", 1.0)
    with pytest.raises(ValueError, match="unknown embedding method 'memcon'"):
        EmbeddingMethodConfig("memcon", 4.0)
    with pytest.raises(ValueError, match="need several collections"):
        build_collection(
            table_configs([ITEM], EmbeddingMethodConfig("memcom", 4.0)) + table_configs(
                [USER], EmbeddingMethodConfig("qr", 4.0, ("user",))), device="meta")


def test_a_new_method_is_one_registry_entry() -> None:
    """A method defined only here is built, accounted and collected by the same code as the others."""
    from memcom_torchrec.modules import methods

    memcom = get_method("memcom")
    fixed = EmbeddingMethod(
        name="memcom_test_only",
        description="MEmCom with a fixed 8 buckets",
        make_config=lambda spec, d, ratio: memcom.make_config(spec, d, N * d / (8 * d + N)),
        max_compression_ratio=lambda n, d: n * d / (8 * d + n),
        config_class=memcom.config_class,
        collection=memcom.collection,
        sharder=memcom.sharder,
    )
    register_method(fixed)
    try:
        (item,) = table_configs([ITEM], EmbeddingMethodConfig("memcom_test_only", 2.0))
        assert item.num_buckets == 8
        assert isinstance(build_collection([item], device="meta"), MEmComEmbeddingBagCollection)
    finally:
        del methods._METHODS["memcom_test_only"]
