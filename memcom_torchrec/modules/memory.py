"""Memory accounting of MEmCom, QR and plain tables: the only source of compression ratios.

Every figure the CLI, benchmarks and tests print about table sizes comes from
``table_memory``.
"""

from dataclasses import dataclass

from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig

from memcom_torchrec.modules.memcom_configs import (
    MEmComEmbeddingBagConfig,
    assignment_dtype,
    variant_compression_ratio,
)
from memcom_torchrec.modules.qr_configs import QREmbeddingBagConfig


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
        num_rows (int): rows of ``d`` actually stored (``m`` for MEmCom, ``ceil(n/p) + p`` for QR).
        num_parameters (int): trainable scalars, ``m*d + n`` for MEmCom (and QR with ``w``),
            ``m*d + 2n`` for ``memcom_2hash``.
        param_bytes (int): bytes of stored parameters (``w``'s grid padding included)
            and of a stored assignment.
        optimizer_state_bytes (int): bytes of optimizer state.
        uncompressed_param_bytes (int): ``n*d`` parameters' bytes.
        uncompressed_optimizer_state_bytes (int): optimizer state of the ``n x d`` table.
        compression_ratio (float): ``n*d / num_parameters``; for the MEmCom-family
            variants ``n*d`` over everything stored (``memcom_configs.stored_floats``).
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
    """Memory of one table under a fused optimizer.

    Args:
        config (EmbeddingBagConfig): a MEmCom, QR or plain table.
        optimizer (EmbOptimType): its fused optimizer.

    Returns:
        TableMemory: parameter and optimizer-state bytes, and the ratio.
    """
    elem = 4 if config.data_type == DataType.FP32 else 2
    n, d = config.num_embeddings, config.embedding_dim
    rows = n
    stored_w = 0  # w (fp32, its own optimizer state): MEmCom's (m, Q) grid, memcom_qr's n scalars
    params = n * d
    ratio = None
    assignment_bytes = 0
    if isinstance(config, MEmComEmbeddingBagConfig):
        rows = config.num_buckets
        if config.train_entity_weights:
            m, q = config.entity_weight_shape
            stored_w = m * q
            params = rows * d + n * config.num_hashes
        else:
            params = rows * d
        if config.stores_assignment:
            assignment_bytes = n * assignment_dtype(config.assignment_cells).itemsize
        if config.is_variant:
            ratio = variant_compression_ratio(
                n, d, rows, config.num_hashes, config.assignment, config.head_fraction
            )
    elif isinstance(config, QREmbeddingBagConfig):
        rows = config.num_rows  # ceil(n/p) quotient rows + p remainder rows
        params = config.num_parameters
        stored_w = config.num_entity_weights
    state = _state_floats(optimizer, rows, d) * 4
    if stored_w:
        state += _entity_state_floats(optimizer, stored_w) * 4
    return TableMemory(
        table=config.name,
        num_embeddings=n,
        embedding_dim=d,
        num_rows=rows,
        num_parameters=params,
        param_bytes=rows * d * elem + stored_w * 4 + assignment_bytes,
        optimizer_state_bytes=state,
        uncompressed_param_bytes=n * d * elem,
        uncompressed_optimizer_state_bytes=_state_floats(optimizer, n, d) * 4,
        compression_ratio=n * d / params if ratio is None else ratio,
        assignment_bytes=assignment_bytes,
    )

