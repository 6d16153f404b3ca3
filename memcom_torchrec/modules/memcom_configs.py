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

The MEmCom family generalises the map from entity to grid cell (``assignment``;
a cell ``s`` is row ``s mod m`` of ``U`` and column ``s // m`` of ``w``), so the
grid layout, its sharding and its fused update serve every variant:

- ``"hash"``, ``num_hashes=1``: MEmCom, cell ``i`` (``i mod m``, ``i // m``);
- ``"hash"``, ``num_hashes=2``: Hash Embeddings' ``k = 2`` case,
  ``w[i, 0] U[i mod m] + w[i, 1] U[h2(i)]``: a second grid half ``C`` columns
  wide holds the second scalars, cell ``m*C + pi(i)`` with ``pi`` a fixed
  permutation of the ids (``pi(i) = (a*i) mod n``, ``a`` coprime to ``n``);
- ``"frequency"``: a stored cell per entity; the ``num_head_buckets`` most
  frequent entities (on the training split) each alone in a row of ``U``, the
  rest packed ``C`` per row;
- ``"clustered"``: a stored cell per entity from a balanced k-means of item
  vectors (``C = ceil(n / m)`` per row); with ``num_hashes=2`` the second cell is
  the second hash's, as above (a clustered row plus a hashed row, as CCE keeps
  a hashed column next to a clustered one).

A stored assignment costs ``n`` int16 (int32 when it addresses more than
32,767 cells) and is counted in the ratio. Every ratio counts what is stored on
one basis (``memcom_storage``, ``modules/storage.py``): ``m*d`` + ``k*n`` scalars
+ the assignment (the grid's padding cells are training memory, not the ratio).
"""

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from torchrec.modules.embedding_configs import EmbeddingBagConfig

from memcom_torchrec.modules.storage import ASSIGNMENT, COMPUTED, TableStorage, TableTensor, register_storage
from memcom_torchrec.modules.validation import check_table_config

# The quotient i // m travels as a float32 per-sample weight through TorchRec's
# input all-to-all (see distributed/), so it must be exactly representable.
MAX_ENTITIES_PER_BUCKET: int = 1 << 24

HASH, FREQUENCY, CLUSTERED = "hash", "frequency", "clustered"
ASSIGNMENTS: Tuple[str, ...] = (HASH, FREQUENCY, CLUSTERED)
# Largest grid whose cells fit a signed int16 (the stored assignment's dtype below it).
INT16_CELLS: int = (1 << 15) - 1


def assignment_dtype(num_cells: int) -> torch.dtype:
    """dtype of a stored assignment into a grid of ``num_cells`` cells (int16 when it fits)."""
    return torch.int16 if num_cells <= INT16_CELLS else torch.int32


def hash_multiplier(num_embeddings: int) -> int:
    """``a`` of the second hash's permutation ``(a*i) mod n``: the first integer >= ``0.618 n`` coprime to ``n``."""
    n = num_embeddings
    a = max(1, int(0.6180339887 * n))
    while math.gcd(a, n) != 1:
        a += 1
    return a


def variant_layout(
    num_embeddings: int, num_buckets: int, num_hashes: int = 1, assignment: str = HASH, head_fraction: float = 0.0
) -> Tuple[int, int]:
    """Grid capacity and head rows of a MEmCom-family table.

    Args:
        num_embeddings (int): ``n``.
        num_buckets (int): ``m``.
        num_hashes (int): ``k``.
        assignment (str): one of ``ASSIGNMENTS``.
        head_fraction (float): ``"frequency"``: share of ``U``'s rows given to the head.

    Returns:
        Tuple[int, int]: ``(C, H)``: cells per row of ``U`` per hash, and head rows.
    """
    n, m = num_embeddings, num_buckets
    if assignment != FREQUENCY:
        return -(-n // m), 0
    head = min(int(head_fraction * m), m - 1, n - 1)
    return -(-(n - head) // (m - head)), head


def memcom_storage(
    name: str,
    num_embeddings: int,
    embedding_dim: int,
    num_buckets: int,
    train_entity_weights: bool = True,
    num_hashes: int = 1,
    assignment: str = HASH,
    head_fraction: float = 0.0,
) -> TableStorage:
    """What a MEmCom-family table stores (see ``modules/storage.py``).

    ``U`` (``m x d``); with trained weights ``w`` (``n``, or ``n x k`` for the
    variants) held in the ``m x Q`` grid of the module docstring; the variants'
    ``rows`` (``n x k``, computed) and a stored ``assignment`` (``n`` int16/int32).
    """
    n, d, m = num_embeddings, embedding_dim, num_buckets
    tensors = [TableTensor("U", (m, d), is_row_table=True)]
    capacity, _ = variant_layout(n, m, num_hashes, assignment, head_fraction)
    variant = num_hashes != 1 or assignment != HASH
    if train_entity_weights:
        shape = (n, num_hashes) if variant else (n,)
        tensors.append(TableTensor("w", shape, held_shape=(m, num_hashes * capacity)))
    if variant:
        tensors.append(TableTensor("rows", (n, num_hashes), kind=COMPUTED, dtype=torch.int64))
    if assignment != HASH:
        tensors.append(TableTensor("assignment", (n,), kind=ASSIGNMENT, dtype=assignment_dtype(m * capacity)))
    options = (("num_hashes", num_hashes), ("assignment", assignment), ("head_fraction", head_fraction))
    return TableStorage(name, n, d, tuple(tensors), options if variant else ())


def variant_compression_ratio(
    num_embeddings: int, embedding_dim: int, num_buckets: int, num_hashes: int = 1, assignment: str = HASH,
    head_fraction: float = 0.0,
) -> float:
    """The ratio of a MEmCom-family table with trained ``w`` (``TableStorage.compression_ratio``)."""
    return memcom_storage("", num_embeddings, embedding_dim, num_buckets, True, num_hashes, assignment,
                          head_fraction).compression_ratio


def variant_buckets_for_ratio(
    num_embeddings: int, embedding_dim: int, ratio: float, num_hashes: int = 1, assignment: str = HASH,
    head_fraction: float = 0.0,
) -> int:
    """Largest ``m`` at which a variant reaches ``ratio`` (0: unreachable even with one row, or two for a head)."""
    n, d = num_embeddings, embedding_dim
    if num_hashes == 1 and assignment == HASH:
        return num_buckets_for_ratio(n, d, ratio)
    m = min(n, math.floor(n * d / ratio / d))  # U alone within the budget
    lowest = 2 if assignment == FREQUENCY else 1
    while m >= lowest and variant_compression_ratio(n, d, m, num_hashes, assignment, head_fraction) < ratio:
        m -= 1
    return m if m >= lowest else 0


def max_variant_compression_ratio(
    num_embeddings: int, embedding_dim: int, num_hashes: int = 1, assignment: str = HASH, head_fraction: float = 0.0
) -> float:
    """The largest ratio a variant reaches (its smallest table: one row of ``U``, two with a head)."""
    m = 2 if assignment == FREQUENCY else 1
    return variant_compression_ratio(num_embeddings, embedding_dim, min(m, num_embeddings), num_hashes, assignment,
                                     head_fraction)


def compression_ratio(num_embeddings: int, embedding_dim: int, num_buckets: int) -> float:
    """Compression ratio of a MEmCom table (``k = 1``, hashed) against the uncompressed ``n x d`` table.

    Args:
        num_embeddings (int): number of entities ``n``.
        embedding_dim (int): embedding dimension ``d``.
        num_buckets (int): rows ``m`` of the shared table ``U``.

    Returns:
        float: ``n*d / (m*d + n)``, always below ``d``.
    """
    return variant_compression_ratio(num_embeddings, embedding_dim, num_buckets)


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
        num_hashes (int): ``k`` rows of ``U`` (and scalars) per entity, 1 or 2
            (see the module docstring).
        assignment (str): entity -> cell map, one of ``ASSIGNMENTS``: ``"hash"``
            computes it; ``"frequency"`` and ``"clustered"`` store it (set it with the
            collection's ``set_assignment``; until then it is MEmCom's own cells).
        head_fraction (float): ``"frequency"``: share of ``U``'s rows given to the
            head (``num_head_buckets = floor(head_fraction * m)``).

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
    num_hashes: int = 1
    assignment: str = HASH
    head_fraction: float = 0.0

    def __post_init__(self) -> None:
        where = check_table_config(self, "MEmCom")
        if self.assignment not in ASSIGNMENTS:
            raise ValueError(f"{where}: unknown assignment '{self.assignment}'; choose one of {list(ASSIGNMENTS)}")
        if self.num_hashes not in (1, 2) or (self.num_hashes == 2 and self.assignment == FREQUENCY):
            raise ValueError(
                f"{where}: num_hashes must be 1, or 2 with assignment 'hash' or 'clustered'; got {self.num_hashes}"
            )
        if self.is_variant and not self.train_entity_weights:
            raise ValueError(f"{where}: num_hashes={self.num_hashes}, assignment '{self.assignment}' need trained w")
        if self.assignment == FREQUENCY and not 0.0 < self.head_fraction < 1.0:
            raise ValueError(f"{where}: assignment 'frequency' needs 0 < head_fraction < 1, got {self.head_fraction}")
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
            if self.is_variant:
                self.num_buckets = variant_buckets_for_ratio(
                    self.num_embeddings, self.embedding_dim, self.compression_ratio, self.num_hashes,
                    self.assignment, self.head_fraction,
                )
                if not self.num_buckets:
                    best = max_variant_compression_ratio(
                        self.num_embeddings, self.embedding_dim, self.num_hashes, self.assignment, self.head_fraction
                    )
                    raise ValueError(
                        f"{where}: compression_ratio {self.compression_ratio:g} is unreachable with "
                        f"num_hashes={self.num_hashes}, assignment '{self.assignment}': at most {best:.4g}"
                    )
            elif self.train_entity_weights:
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
        if self.assignment == FREQUENCY and self.num_buckets < 2:
            raise ValueError(f"{where}: assignment 'frequency' needs num_buckets >= 2 (a head and a tail row)")
        if self.grid_columns > MAX_ENTITIES_PER_BUCKET:
            raise ValueError(
                f"{where}: ceil(num_embeddings / num_buckets) = {self.grid_columns}"
                f" exceeds {MAX_ENTITIES_PER_BUCKET}; use more buckets"
            )
        super().__post_init__()

    @property
    def is_variant(self) -> bool:
        """Whether the entity -> cell map is not MEmCom's own ``(i mod m, i // m)``."""
        return self.num_hashes != 1 or self.assignment != HASH

    @property
    def stores_assignment(self) -> bool:
        """Whether the table holds an assignment tensor (``"frequency"``, ``"clustered"``)."""
        return self.assignment != HASH

    @property
    def hash_columns(self) -> int:
        """``C``: cells per row of ``U`` per hash (``ceil(n / m)``; the tail's with a frequency head)."""
        return variant_layout(self.num_embeddings, self.num_buckets, self.num_hashes, self.assignment,
                              self.head_fraction)[0]

    @property
    def num_head_buckets(self) -> int:
        """``H``: rows of ``U`` each holding one head entity (``"frequency"``; 0 otherwise)."""
        return variant_layout(self.num_embeddings, self.num_buckets, self.num_hashes, self.assignment,
                              self.head_fraction)[1]

    @property
    def grid_columns(self) -> int:
        """Columns of the ``w`` grid: ``Q = ceil(n / m)`` for MEmCom, ``num_hashes * C`` for the variants."""
        return self.num_hashes * self.hash_columns

    @property
    def num_cells(self) -> int:
        """Cells of the ``w`` grid (``m`` x columns)."""
        return self.num_buckets * self.grid_columns

    @property
    def assignment_cells(self) -> int:
        """Cells a stored assignment may use: the first hash's ``m * C`` (a second hash has the rest)."""
        return self.num_buckets * self.hash_columns

    @property
    def entity_weight_shape(self) -> Tuple[int, int]:
        """Shape ``(m, Q)`` of the stored per-entity weights (empty if frozen)."""
        if not self.train_entity_weights:
            return (self.num_buckets, 0)
        return (self.num_buckets, self.grid_columns)


def _storage_of(config: MEmComEmbeddingBagConfig) -> TableStorage:
    return memcom_storage(config.name, config.num_embeddings, config.embedding_dim, config.num_buckets,
                          config.train_entity_weights, config.num_hashes, config.assignment, config.head_fraction)


register_storage(MEmComEmbeddingBagConfig, _storage_of)
