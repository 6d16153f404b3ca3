"""Configuration of MEmCom tables.

A MEmCom table for ``n`` entities keeps a shared hashed table ``U`` of ``m``
rows (``num_buckets``) and one trainable scalar per entity, ``w``. Entity ``i``
is embedded as ``w[i] * U[i mod m]``.

Storage layout of ``w``: a grid of shape ``(m, Q)`` with ``Q = ceil(n / m)``,
entity ``i`` at ``(i mod m, i // m)``. Row ``h`` of the grid holds exactly the
entities that share row ``h`` of ``U``, so sharding ``U`` and ``w`` by the same
row blocks keeps every entity's scalar next to its vector (see
``memcom_torchrec.distributed``). The at most ``m - 1`` padding cells of the
grid are never looked up.
"""

import math
from dataclasses import dataclass
from typing import Optional, Tuple

from torchrec.modules.embedding_configs import EmbeddingBagConfig

from memcom_torchrec.modules.validation import check_table_config

# The quotient i // m travels as a float32 per-sample weight through TorchRec's
# input all-to-all (see distributed/), so it must be exactly representable.
MAX_ENTITIES_PER_BUCKET: int = 1 << 24


def compression_ratio(num_embeddings: int, embedding_dim: int, num_buckets: int) -> float:
    """Compression ratio of a MEmCom table against the uncompressed ``n x d`` table.

    Args:
        num_embeddings (int): number of entities ``n``.
        embedding_dim (int): embedding dimension ``d``.
        num_buckets (int): rows ``m`` of the shared table ``U``.

    Returns:
        float: ``n*d / (m*d + n)``, always below ``d``.
    """
    return num_embeddings * embedding_dim / (num_buckets * embedding_dim + num_embeddings)


def num_buckets_for_ratio(num_embeddings: int, embedding_dim: int, ratio: float) -> int:
    """Largest ``m`` whose compression ratio is at least ``ratio`` (at least 1 row).

    Args:
        num_embeddings (int): number of entities ``n``.
        embedding_dim (int): embedding dimension ``d``.
        ratio (float): target compression ratio, ``1 <= ratio < d``.

    Returns:
        int: number of buckets ``m``.

    Raises:
        ValueError: if the ratio cannot be reached (``ratio >= d``: ``w`` alone
            already costs ``n`` floats).
    """
    if not ratio >= 1.0:
        raise ValueError(f"compression_ratio must be >= 1, got {ratio}")
    if ratio >= embedding_dim:
        raise ValueError(
            f"compression_ratio {ratio} is unreachable with MEmCom at embedding_dim="
            f"{embedding_dim}: the per-entity weights alone cap it below {embedding_dim}"
        )
    m = math.floor((num_embeddings * embedding_dim / ratio - num_embeddings) / embedding_dim)
    m = max(1, min(num_embeddings, m))
    # floor() keeps the ratio >= target, but guard against float rounding.
    while m > 1 and compression_ratio(num_embeddings, embedding_dim, m) < ratio:
        m -= 1
    return m


@dataclass
class MEmComEmbeddingBagConfig(EmbeddingBagConfig):
    """An ``EmbeddingBagConfig`` compressed with MEmCom.

    ``num_embeddings`` is the number of entities ``n``; give either
    ``num_buckets`` (``m``) or ``compression_ratio`` (``m`` is derived).

    Args:
        num_buckets (int): rows of the shared table ``U`` (0: derive from
            ``compression_ratio``).
        compression_ratio (Optional[float]): target ``n*d / (m*d + n)``.
        entity_weight_init (float): initial value of every per-entity weight.
        train_entity_weights (bool): False freezes ``w`` and stores none: the
            hashing trick, ``U[i mod m]`` (compression ratio ``n / m``).

    Example::

        items = MEmComEmbeddingBagConfig(
            name="items", num_embeddings=1_000_000, embedding_dim=64,
            feature_names=["item_id", "history"], compression_ratio=16.0,
        )
    """

    num_buckets: int = 0
    compression_ratio: Optional[float] = None
    entity_weight_init: float = 1.0
    train_entity_weights: bool = True

    def __post_init__(self) -> None:
        where = check_table_config(self, "MEmCom")
        if not self.train_entity_weights and self.entity_weight_init != 1.0:
            raise ValueError(
                f"{where}: entity_weight_init={self.entity_weight_init} with train_entity_weights=False; "
                "the hashing trick keeps no w (its weight is 1)"
            )
        if self.num_buckets and self.compression_ratio is not None:
            raise ValueError(f"{where}: give num_buckets or compression_ratio, not both")
        if not self.num_buckets:
            if self.compression_ratio is None:
                raise ValueError(f"{where}: give num_buckets or compression_ratio")
            if self.train_entity_weights:
                self.num_buckets = num_buckets_for_ratio(
                    self.num_embeddings, self.embedding_dim, self.compression_ratio
                )
            else:
                self.num_buckets = max(1, math.floor(self.num_embeddings / self.compression_ratio))
        if not 0 < self.num_buckets <= self.num_embeddings:
            raise ValueError(
                f"{where}: num_buckets must be in [1, num_embeddings={self.num_embeddings}], "
                f"got {self.num_buckets}"
            )
        if self.num_entities_per_bucket > MAX_ENTITIES_PER_BUCKET:
            raise ValueError(
                f"{where}: ceil(num_embeddings / num_buckets) = {self.num_entities_per_bucket}"
                f" exceeds {MAX_ENTITIES_PER_BUCKET}; use more buckets"
            )
        super().__post_init__()

    @property
    def num_entities_per_bucket(self) -> int:
        """``Q = ceil(n / m)``: columns of the ``w`` grid."""
        return -(-self.num_embeddings // self.num_buckets)

    @property
    def entity_weight_shape(self) -> Tuple[int, int]:
        """Shape ``(m, Q)`` of the stored per-entity weights (empty if frozen)."""
        if not self.train_entity_weights:
            return (self.num_buckets, 0)
        return (self.num_buckets, self.num_entities_per_bucket)
