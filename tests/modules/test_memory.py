"""table_memory: bytes, optimizer state and compression ratio of each kind of table."""

import math

import pytest
from fbgemm_gpu.split_embedding_configs import EmbOptimType

from memcom_torchrec.modules.memory import table_memory
from memcom_torchrec.modules.qr_configs import QREmbeddingBagConfig


def test_table_memory_of_qr_table() -> None:
    t = QREmbeddingBagConfig(name="t", num_embeddings=1000, embedding_dim=16, feature_names=["f"], num_collisions=30)
    rows = math.ceil(1000 / 30) + 30
    mem = table_memory(t, EmbOptimType.EXACT_ROWWISE_ADAGRAD)
    assert mem.num_rows == rows == t.num_rows
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
    assert mem.param_bytes == (rows * 16 + 1001) * 4  # w: one fp32 scalar per entity, no padding
    assert mem.optimizer_state_bytes == (rows + 1001) * 4  # one row-wise state per row of Q and R, one per w
    assert table_memory(t, EmbOptimType.EXACT_SGD).optimizer_state_bytes == 0
    assert table_memory(t, EmbOptimType.EXACT_ADAGRAD).optimizer_state_bytes == (rows * 16 + 1001) * 4
    assert mem.compression_ratio == pytest.approx(1001 * 16 / (rows * 16 + 1001))
