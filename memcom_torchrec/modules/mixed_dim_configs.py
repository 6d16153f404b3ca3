"""Configs of mixed-dimension tables (Ginart et al., "Mixed Dimension Embeddings", 2019).

Entities are split by training frequency into two blocks: the ``h`` most frequent (the head)
keep a full ``d``-wide row, the others (the tail) a ``t``-wide row lifted to ``d`` by a shared
projection ``P`` (``d x t``). A stored map gives each entity its slot: slot ``s < h`` is row
``s`` of the head table, slot ``s >= h`` row ``s - h`` of the tail table (``n`` int16, int32
above 32,767 entities, counted in the ratio). Until the frequencies are set (the trainer sets
them from the training split), slot ``i`` is entity ``i`` (the collection's ``reset_parameters``).

Ratio (``modules/storage.py``'s one basis): ``n*d / (h*d + (n - h)*t + d*t + n*bytes/4)``.
Rule for a target ratio: the tail is as wide as the budget allows up to ``d / 4`` (a multiple of
4, FBGEMM's TBE, at least 4 and below ``d``), and the head takes every row left in the budget (at least one): at 4x on
ML-1M's 3,706 items (d = 64) ``t = 12`` and ``h = 234``; the largest ratio (``t = 4``, ``h = 1``)
is 14.0x there.
"""

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from memcom_torchrec.modules.memcom_configs import FREQUENCY, assignment_dtype
from memcom_torchrec.modules.storage import ASSIGNMENT, TableStorage, TableTensor, register_storage
from memcom_torchrec.modules.validation import check_table_config

# FBGEMM's table-batched lookups take widths that are multiples of 4.
DIM_STEP: int = 4
# The widest tail, as a share of d.
MAX_TAIL_FRACTION: float = 0.25


def mixed_dim_storage(name: str, num_embeddings: int, embedding_dim: int, head_rows: int, tail_dim: int
                      ) -> TableStorage:
    """What a mixed-dimension table stores: ``head`` (``h x d``), ``tail`` (``(n-h) x t``), ``P`` and ``slots``."""
    n, d, h, t = num_embeddings, embedding_dim, head_rows, tail_dim
    return TableStorage(name, n, d, (
        TableTensor("head", (h, d), is_row_table=True),
        TableTensor("tail", (n - h, t), is_row_table=True),
        TableTensor("P", (d, t), dense_layer=True),
        TableTensor("slots", (n,), kind=ASSIGNMENT, dtype=assignment_dtype(n), handed_over=True),
    ))


def blocks_for_ratio(num_embeddings: int, embedding_dim: int, ratio: float) -> Optional[Tuple[int, int]]:
    """``(h, t)`` for a target ratio by the module docstring's rule; ``None`` if no split reaches it."""
    n, d = num_embeddings, embedding_dim
    t = max(DIM_STEP, int(d * MAX_TAIL_FRACTION) // DIM_STEP * DIM_STEP)  # at least 4 wide, below d
    while DIM_STEP <= t < d:
        rest = mixed_dim_storage("", n, d, 0, t).stored_floats  # the tail, P and the slots, no head
        h = min(n - 1, math.floor((n * d / ratio - rest) / (d - t)))
        while h >= 1 and mixed_dim_storage("", n, d, h, t).compression_ratio < ratio:  # float rounding
            h -= 1
        if h >= 1:
            return h, t
        t -= DIM_STEP
    return None


def frequency_slots(counts: torch.Tensor) -> torch.Tensor:
    """Slots by training frequency: the ``r``-th most frequent entity (ties by id) gets slot ``r``.

    Args:
        counts (torch.Tensor): ``n`` training interactions per entity.

    Returns:
        torch.Tensor: ``n`` slots (int64), a permutation of ``[0, n)``.
    """
    order = torch.argsort(-counts.double(), stable=True)
    slots = torch.empty(counts.numel(), dtype=torch.long)
    slots[order] = torch.arange(counts.numel())
    return slots


def max_mixed_dim_compression_ratio(num_embeddings: int, embedding_dim: int) -> float:
    """The ratio of the smallest split: one head row, a 4-wide tail (1.0, unreachable, at ``d <= 4``)."""
    if embedding_dim <= DIM_STEP or num_embeddings < 2:
        return 1.0
    return mixed_dim_storage("", num_embeddings, embedding_dim, 1, DIM_STEP).compression_ratio


@dataclass
class MixedDimEmbeddingBagConfig(EmbeddingBagConfig):
    """An ``EmbeddingBagConfig`` stored as a full-width head and a projected narrow tail, by frequency.

    Give either ``head_rows`` and ``tail_dim`` or ``compression_ratio`` (both derived by
    ``blocks_for_ratio``).

    Args:
        head_rows (int): ``h``, entities with a full ``d``-wide row (0: derive).
        tail_dim (int): ``t``, width of the other entities' rows, a multiple of 4 below ``d`` (0: derive).
        compression_ratio (Optional[float]): target ``n*d`` over what is stored.

    Example::

        items = MixedDimEmbeddingBagConfig(
            name="item", num_embeddings=3706, embedding_dim=64,
            feature_names=["history"], compression_ratio=4.0,
        )  # 234 head rows of 64, 3,472 tail rows of 12, P 64 x 12, int16 slots
    """

    head_rows: int = 0
    tail_dim: int = 0
    compression_ratio: Optional[float] = None

    def __post_init__(self) -> None:
        where = check_table_config(self, "mixed-dimension")
        given = bool(self.head_rows or self.tail_dim)
        if given and self.compression_ratio is not None:
            raise ValueError(f"{where}: give head_rows and tail_dim, or compression_ratio, not both")
        if not given:
            if self.compression_ratio is None:
                raise ValueError(f"{where}: give head_rows and tail_dim, or compression_ratio")
            blocks = blocks_for_ratio(self.num_embeddings, self.embedding_dim, self.compression_ratio)
            if blocks is None:
                best = max_mixed_dim_compression_ratio(self.num_embeddings, self.embedding_dim)
                raise ValueError(f"{where}: compression_ratio {self.compression_ratio:g} is unreachable with a "
                                 f"mixed-dimension table: at most {best:.4g}")
            self.head_rows, self.tail_dim = blocks
        if not 1 <= self.head_rows < self.num_embeddings:
            raise ValueError(f"{where}: head_rows must be in [1, num_embeddings={self.num_embeddings}), "
                             f"got {self.head_rows}")
        if self.tail_dim % DIM_STEP or not 0 < self.tail_dim < self.embedding_dim:
            raise ValueError(f"{where}: tail_dim must be a multiple of {DIM_STEP} in (0, embedding_dim="
                             f"{self.embedding_dim}), got {self.tail_dim}")
        super().__post_init__()

    @property
    def assignment(self) -> str:
        """How the slots are chosen: by training frequency (the trainer sets them)."""
        return FREQUENCY

    @property
    def stores_assignment(self) -> bool:
        return True

    @property
    def assignment_cells(self) -> int:
        """Slots a stored assignment may use: ``n`` (it is a permutation)."""
        return self.num_embeddings


def _storage_of(config: MixedDimEmbeddingBagConfig) -> TableStorage:
    return mixed_dim_storage(config.name, config.num_embeddings, config.embedding_dim, config.head_rows,
                             config.tail_dim)


register_storage(MixedDimEmbeddingBagConfig, _storage_of)
