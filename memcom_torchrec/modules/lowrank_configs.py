"""Configs of low-rank tables: an ``n x k`` table ``A`` and a ``k -> d`` projection ``P``.

Entity ``i`` is ``P A[i]`` (``A[i]`` a ``k``-vector, ``P`` a ``d x k`` matrix shared by every
entity), the factorised table the CCE authors found strongest near 16x on ML-1M. A bag
pools ``P (sum_j A[i_j])``: the projection commutes with sum and mean pooling, so the
collection pools ``A``'s rows with FBGEMM and projects the pooled ``k``-vector once.

Ratio (``modules/storage.py``'s one basis): ``n*d / (n*k + k*d)``. ``k`` must be a multiple
of 4 (FBGEMM's TBE), so the largest ratio is reached at ``k = 4``: ``n*d / (4 (n + d))``,
15.7x for ML-1M's 3,706 items at ``d = 64``.
"""

from dataclasses import dataclass
from typing import Optional

from torchrec.modules.embedding_configs import EmbeddingBagConfig

from memcom_torchrec.modules.storage import TableStorage, TableTensor, register_storage
from memcom_torchrec.modules.validation import check_table_config

# FBGEMM's table-batched lookups take widths that are multiples of 4.
RANK_STEP: int = 4


def lowrank_storage(name: str, num_embeddings: int, embedding_dim: int, rank: int) -> TableStorage:
    """What a low-rank table stores: ``A`` (``n x k``, FBGEMM rows) and ``P`` (``d x k``, a dense layer)."""
    n, d, k = num_embeddings, embedding_dim, rank
    return TableStorage(name, n, d, (TableTensor("A", (n, k), is_row_table=True), TableTensor("P", (d, k), dense_layer=True)))


def rank_for_ratio(num_embeddings: int, embedding_dim: int, ratio: float) -> int:
    """The largest rank ``k`` (a multiple of 4, below ``d``) whose ratio reaches ``ratio``; 0 if none does."""
    n, d = num_embeddings, embedding_dim
    k = (d - 1) // RANK_STEP * RANK_STEP
    while k >= RANK_STEP and lowrank_storage("", n, d, k).compression_ratio < ratio:
        k -= RANK_STEP
    return max(k, 0)


def max_lowrank_compression_ratio(num_embeddings: int, embedding_dim: int) -> float:
    """The ratio at the smallest rank, ``k = 4``."""
    return lowrank_storage("", num_embeddings, embedding_dim, RANK_STEP).compression_ratio


@dataclass
class LowRankEmbeddingBagConfig(EmbeddingBagConfig):
    """An ``EmbeddingBagConfig`` stored as an ``n x k`` table and a ``k -> d`` projection.

    ``num_embeddings`` is the number of entities ``n``, ``embedding_dim`` the output ``d``;
    give either ``rank`` (``k``) or ``compression_ratio`` (``k`` derived by ``rank_for_ratio``).

    Args:
        rank (int): width ``k`` of ``A``, a multiple of 4 below ``d`` (0: derive from
            ``compression_ratio``).
        compression_ratio (Optional[float]): target ``n*d / (n*k + k*d)``.

    Example::

        items = LowRankEmbeddingBagConfig(
            name="items", num_embeddings=3706, embedding_dim=64,
            feature_names=["history"], compression_ratio=4.0,
        )  # rank 12: 3706 x 12 + 64 x 12 floats (5.2x)
    """

    rank: int = 0
    compression_ratio: Optional[float] = None

    def __post_init__(self) -> None:
        where = check_table_config(self, "low-rank")
        if self.rank and self.compression_ratio is not None:
            raise ValueError(f"{where}: give rank or compression_ratio, not both")
        if not self.rank:
            if self.compression_ratio is None:
                raise ValueError(f"{where}: give rank or compression_ratio")
            self.rank = rank_for_ratio(self.num_embeddings, self.embedding_dim, self.compression_ratio)
            if not self.rank:
                best = max_lowrank_compression_ratio(self.num_embeddings, self.embedding_dim)
                raise ValueError(
                    f"{where}: compression_ratio {self.compression_ratio:g} is unreachable with a low-rank table "
                    f"(rank a multiple of {RANK_STEP}): at most {best:.4g}"
                )
        if self.rank % RANK_STEP or not 0 < self.rank < self.embedding_dim:
            raise ValueError(
                f"{where}: rank must be a multiple of {RANK_STEP} in (0, embedding_dim={self.embedding_dim}), "
                f"got {self.rank}"
            )
        super().__post_init__()


def _storage_of(config: LowRankEmbeddingBagConfig) -> TableStorage:
    return lowrank_storage(config.name, config.num_embeddings, config.embedding_dim, config.rank)


register_storage(LowRankEmbeddingBagConfig, _storage_of)
