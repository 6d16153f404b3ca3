"""table_memory: bytes, optimizer state and compression ratio of each kind of table."""

import math
from dataclasses import dataclass

import pytest
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from memcom_torchrec.modules.memory import table_memory
from memcom_torchrec.modules.qr_configs import QREmbeddingBagConfig


def test_table_memory_of_qr_table() -> None:
    t = QREmbeddingBagConfig(name="t", num_embeddings=1000, embedding_dim=16, feature_names=["f"], num_collisions=30)
    rows = math.ceil(1000 / 30) + 30
    mem = table_memory(t, EmbOptimType.EXACT_ROWWISE_ADAGRAD)
    assert mem.num_rows == rows
    assert mem.num_parameters == rows * 16
    assert mem.param_bytes == rows * 16 * 4
    assert mem.optimizer_state_bytes == rows * 4
    assert mem.compression_ratio == pytest.approx(1000 * 16 / (rows * 16))
    assert table_memory(t, EmbOptimType.EXACT_SGD).optimizer_state_bytes == 0


def test_table_memory_of_qr_table_with_entity_weights() -> None:
    t = QREmbeddingBagConfig(name="t", num_embeddings=1001, embedding_dim=16, feature_names=["f"], num_collisions=30,
                             entity_weights=True)
    rows = math.ceil(1001 / 30) + 30
    mem = table_memory(t, EmbOptimType.EXACT_ROWWISE_ADAGRAD)
    assert mem.num_rows == rows
    assert mem.num_parameters == rows * 16 + 1001
    cells = math.ceil(1001 / 30) * 30  # w held in a ceil(n/p) x p grid next to Q's rows (29 padding cells)
    assert mem.param_bytes == (rows * 16 + cells) * 4
    assert mem.optimizer_state_bytes == (rows + cells) * 4  # one row-wise state per row of Q and R, one per w cell
    assert mem.compression_ratio == pytest.approx(1001 * 16 / (rows * 16 + 1001))  # the ratio counts n scalars
    assert table_memory(t, EmbOptimType.EXACT_SGD).optimizer_state_bytes == 0
    assert table_memory(t, EmbOptimType.EXACT_ADAGRAD).optimizer_state_bytes == (rows * 16 + cells) * 4
    assert mem.compression_ratio == pytest.approx(1001 * 16 / (rows * 16 + 1001))


def test_a_table_config_without_a_storage_description_is_refused() -> None:
    """A new config class that registered no storage gets a named error, not a ratio of 1.0."""

    @dataclass
    class NewTableConfig(EmbeddingBagConfig):
        rank: int = 4

    t = NewTableConfig(name="t", num_embeddings=100, embedding_dim=8, feature_names=["f"])
    with pytest.raises(ValueError, match="table 't': no storage description for NewTableConfig"):
        table_memory(t)


def test_table_memory_of_a_lowrank_table() -> None:
    """A (n x k, FBGEMM rows with row-wise state) and P (d x k, fp32 with Adam's two moments); ratio n*d / (n*k + k*d)."""
    from memcom_torchrec.modules.lowrank_configs import LowRankEmbeddingBagConfig

    t = LowRankEmbeddingBagConfig(name="t", num_embeddings=3706, embedding_dim=64, feature_names=["f"],
                                  compression_ratio=4.0)
    k = t.rank
    assert k == 12 and 3706 * 64 / (3706 * (k + 4) + 64 * (k + 4)) < 4.0  # the next rank up misses 4x
    mem = table_memory(t, EmbOptimType.EXACT_ROWWISE_ADAGRAD)
    assert mem.num_rows == 3706 and mem.num_parameters == 3706 * k + 64 * k
    assert mem.param_bytes == (3706 * k + 64 * k) * 4
    assert mem.optimizer_state_bytes == (3706 + 2 * 64 * k) * 4
    assert mem.compression_ratio == pytest.approx(3706 * 64 / (3706 * k + 64 * k))


def test_table_memory_of_a_mixed_dim_table() -> None:
    """head (h x d) and tail ((n-h) x t) FBGEMM rows, P (d x t), int16 slots; the largest head within 4x."""
    from memcom_torchrec.modules.mixed_dim_configs import MixedDimEmbeddingBagConfig

    n, d = 3706, 64
    t = MixedDimEmbeddingBagConfig(name="t", num_embeddings=n, embedding_dim=d, feature_names=["f"],
                                   compression_ratio=4.0)
    h, w = t.head_rows, t.tail_dim
    stored = h * d + (n - h) * w + d * w + n * 2 / 4
    assert (h, w) == (234, 12) and stored <= n * d / 4 < stored + (d - w)  # one more head row would miss 4x
    mem = table_memory(t, EmbOptimType.EXACT_ROWWISE_ADAGRAD)
    assert mem.num_rows == n and mem.assignment_bytes == 2 * n
    assert mem.param_bytes == (h * d + (n - h) * w + d * w) * 4 + 2 * n
    assert mem.optimizer_state_bytes == (n + 2 * d * w) * 4
    assert mem.compression_ratio == pytest.approx(n * d / stored)
