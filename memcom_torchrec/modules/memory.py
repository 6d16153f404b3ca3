"""Memory accounting of a table under a fused optimizer, from its storage description.

Every figure the CLI, benchmarks and tests print about table sizes comes from
``table_memory``, which reads ``modules/storage.py``'s ``table_storage``: the
ratio is ``TableStorage.compression_ratio``; the bytes are what the training
layout holds (``w``'s grid padding included).
"""

from dataclasses import dataclass

from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig

from memcom_torchrec.modules.storage import ASSIGNMENT, PARAMETER, table_storage


def _state_floats(optimizer: EmbOptimType, rows: int, dim: int) -> int:
    """Optimizer-state floats of a ``rows x dim`` FBGEMM table."""
    if optimizer in (EmbOptimType.EXACT_SGD, EmbOptimType.SGD, EmbOptimType.NONE):
        return 0
    if optimizer in (EmbOptimType.EXACT_ROWWISE_ADAGRAD, EmbOptimType.ROWWISE_ADAGRAD):
        return rows
    if optimizer == EmbOptimType.EXACT_ADAGRAD:
        return rows * dim
    if optimizer == EmbOptimType.PARTIAL_ROWWISE_ADAM:
        return rows * dim + rows
    if optimizer == EmbOptimType.ADAM:
        return 2 * rows * dim
    raise ValueError(f"no memory model for optimizer {optimizer}")


def _entity_state_floats(optimizer: EmbOptimType, entities: int) -> int:
    """Optimizer-state floats of MEmCom's per-entity weights (see memcom_torchrec.optim)."""
    if optimizer in (EmbOptimType.EXACT_SGD, EmbOptimType.SGD, EmbOptimType.NONE):
        return 0
    if optimizer in (EmbOptimType.ADAM, EmbOptimType.PARTIAL_ROWWISE_ADAM):
        return 2 * entities
    return entities


@dataclass(frozen=True)
class TableMemory:
    """Sizes of one table and of its uncompressed ``n x d`` counterpart.

    Args:
        table (str): table name.
        num_embeddings (int): entities ``n``.
        embedding_dim (int): ``d``.
        num_rows (int): rows of FBGEMM tables stored (``m`` for MEmCom, ``ceil(n/p) + p`` for QR,
            ``n`` for low-rank and mixed-dimension tables, whose rows are narrower than ``d``).
        num_parameters (int): trainable scalars, ``m*d + n`` for MEmCom,
            ``m*d + 2n`` for ``memcom_2hash`` (``TableStorage.num_parameters``).
        param_bytes (int): bytes of stored parameters (``w``'s grid padding included)
            and of a stored assignment.
        optimizer_state_bytes (int): bytes of optimizer state.
        uncompressed_param_bytes (int): ``n*d`` parameters' bytes.
        uncompressed_optimizer_state_bytes (int): optimizer state of the ``n x d`` table.
        compression_ratio (float): ``n*d / stored_floats`` (``TableStorage.compression_ratio``).
        assignment_bytes (int): bytes of a stored entity -> cell map (0: computed).
    """

    table: str
    num_embeddings: int
    embedding_dim: int
    num_rows: int
    num_parameters: int
    param_bytes: int
    optimizer_state_bytes: int
    uncompressed_param_bytes: int
    uncompressed_optimizer_state_bytes: int
    compression_ratio: float
    assignment_bytes: int = 0


def table_memory(
    config: EmbeddingBagConfig, optimizer: EmbOptimType = EmbOptimType.EXACT_ROWWISE_ADAGRAD
) -> TableMemory:
    """Memory of one table under a fused optimizer, from its storage description (``table_storage``).

    Args:
        config (EmbeddingBagConfig): a table config with a registered storage description.
        optimizer (EmbOptimType): its fused optimizer.

    Returns:
        TableMemory: parameter and optimizer-state bytes (as the training layout holds
        them, padding included), and the ratio (``TableStorage.compression_ratio``).

    Raises:
        ValueError: no storage description is registered for the config's class.
    """
    storage = table_storage(config)
    elem = 4 if config.data_type == DataType.FP32 else 2
    n, d = storage.num_embeddings, storage.embedding_dim
    param_bytes = state = 0
    for t in storage.tensors:
        if t.kind == ASSIGNMENT:
            param_bytes += t.numel * t.dtype.itemsize
        elif t.kind == PARAMETER and t.is_row_table:  # FBGEMM's tables, in the config's data type
            param_bytes += t.numel * elem
            state += _state_floats(optimizer, t.shape[0], t.shape[1]) * 4
        elif t.kind == PARAMETER and t.dense_layer:  # a projection: fp32, the dense Adam's two moments
            param_bytes += t.numel * 4
            state += 2 * t.numel * 4
        elif t.kind == PARAMETER:  # w, in its padded grid: fp32, its own element-wise state
            param_bytes += t.held_numel * 4
            state += _entity_state_floats(optimizer, t.held_numel) * 4
    return TableMemory(
        table=config.name,
        num_embeddings=n,
        embedding_dim=d,
        num_rows=storage.num_rows,
        num_parameters=storage.num_parameters,
        param_bytes=param_bytes,
        optimizer_state_bytes=state,
        uncompressed_param_bytes=n * d * elem,
        uncompressed_optimizer_state_bytes=_state_floats(optimizer, n, d) * 4,
        compression_ratio=storage.compression_ratio,
        assignment_bytes=storage.assignment_bytes,
    )
