"""Configs of the quotient-remainder (QR) trick: sizes, the ratio rule, per-feature plans.

Shi et al., "Compositional Embeddings Using Complementary Partitions for
Memory-Efficient Recommendation Systems" (KDD 2020). A table of ``n`` entities
is replaced by a quotient table ``Q`` of ``ceil(n / p)`` rows and a remainder
table ``R`` of ``p`` rows (``p`` = ``num_collisions``); entity ``i`` is embedded
as ``Q[i // p] * R[i % p]`` (element-wise product, the paper's best operation).
The pair ``(i // p, i % p)`` is unique per entity, so every entity still gets a
vector of its own. Compression ratio: ``n*d / ((ceil(n/p) + p) * d)``, at most
``n / ceil(2 * sqrt(n))`` (reached near ``p = sqrt(n)``).

``entity_weights=True`` (method ``memcom_qr``, a MEmCom variant beyond the
paper) adds MEmCom's trainable scalar per entity: ``w[i] * Q[i // p] * R[i % p]``
(``n`` more parameters, counted in the ratio).

This file holds what both the unsharded collection
(``modules/qr_embedding_modules.py``) and its sharded twin
(``distributed/qr_embeddingbag.py``) read: the ratio solver, the config, the
per-feature lookup plan and the configs of the inner ``EmbeddingCollection``s
holding ``Q``, ``R`` and plain tables.
"""

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType

from memcom_torchrec.modules.storage import TableStorage, TableTensor, register_storage
from memcom_torchrec.modules.validation import check_table_config

QUOTIENT_SUFFIX: str = "__q"
REMAINDER_SUFFIX: str = "__r"
EMBEDDING_COLLECTION: str = "_embedding_collection"
ENTITY_WEIGHTS: str = "_entity_weights"  # parameter ``_entity_weights.<table>``, as MEmCom's
ENTITY_WEIGHT_INIT: float = 1.0

# ---------------------------------------------------------------------------
# Sizes and the ratio -> p rule
# ---------------------------------------------------------------------------
def qr_num_rows(num_embeddings: int, num_collisions: int) -> int:
    """Rows stored by a QR table: ``ceil(n / p) + p``.

    Args:
        num_embeddings (int): entities ``n``.
        num_collisions (int): rows ``p`` of the remainder table.

    Returns:
        int: ``ceil(n / p) + p``.
    """
    return -(-num_embeddings // num_collisions) + num_collisions


def _smallest_p_within_rows(num_embeddings: int, max_rows: int) -> Optional[int]:
    """Smallest ``p`` in ``[1, n]`` with ``ceil(n/p) + p <= max_rows``, ``None`` if none.

    ``ceil(n/p) <= L - p`` iff ``n <= p (L - p)`` (``L - p`` is an integer), so
    ``p`` is the smaller root of ``p^2 - L p + n``, rounded up.
    """
    n, limit = num_embeddings, max_rows
    disc = limit * limit - 4 * n
    if disc < 0:
        return None
    p = max(1, (limit - math.isqrt(disc)) // 2)
    while p > 1 and (p - 1) * (limit - p + 1) >= n:
        p -= 1
    while p * (limit - p) < n and 2 * p <= limit:
        p += 1
    if p * (limit - p) < n or p > n:
        return None
    return p


def max_qr_compression_ratio(num_embeddings: int, embedding_dim: int = 1, extra_params: int = 0) -> Tuple[int, float]:
    """The most compressing ``p`` and its ratio.

    ``ceil(n/p) + p`` is smallest (``ceil(2 * sqrt(n))`` rows) near
    ``p = sqrt(n)``; several ``p`` may reach it, the smallest is returned
    (the same choice ``num_collisions_for_ratio`` makes).

    Args:
        num_embeddings (int): entities ``n``.
        embedding_dim (int): ``d`` (only matters with ``extra_params``).
        extra_params (int): parameters stored besides ``Q`` and ``R`` (``n``
            for ``memcom_qr``'s per-entity weights).

    Returns:
        Tuple[int, float]: the smallest ``p`` with the fewest rows, and
        ``n*d / (rows*d + extra_params)``.
    """
    n = num_embeddings
    r = math.isqrt(n)
    min_rows = min(qr_num_rows(n, p) for p in range(max(1, r - 1), min(n, r + 2) + 1))
    p = _smallest_p_within_rows(n, min_rows)
    assert p is not None
    return p, n * embedding_dim / (min_rows * embedding_dim + extra_params)


def num_collisions_for_ratio(
    num_embeddings: int, ratio: float, embedding_dim: int = 1, extra_params: int = 0
) -> int:
    """The ``p`` a target compression ratio selects.

    Rule: the *smallest* ``p`` whose ratio reaches the target, i.e. the smallest
    ``p >= 1`` with ``n / (ceil(n/p) + p) >= ratio``. Among all tables that meet
    the memory budget it keeps the largest quotient table (fewest entities
    sharing a row of ``Q``). Integer form: with ``L = floor(n / ratio)`` the
    largest admissible row count, ``ceil(n/p) + p <= L`` iff
    ``p * (L - p) >= n``, so ``p`` is the smaller root of ``p^2 - L p + n``,
    rounded up. (The embedding dimension cancels out of the ratio, unless
    ``extra_params`` are stored too: then ``L`` is the largest row count with
    ``n*d / (L*d + extra_params) >= ratio``.)

    Args:
        num_embeddings (int): entities ``n``.
        ratio (float): target ratio, ``1 <= ratio <= max_qr_compression_ratio(n)``.
        embedding_dim (int): ``d`` (only matters with ``extra_params``).
        extra_params (int): parameters stored besides ``Q`` and ``R``.

    Returns:
        int: ``p``.

    Raises:
        ValueError: ``ratio < 1``, or ``ratio`` above the best QR can do for ``n``.

    Example::

        num_collisions_for_ratio(1_000_000, 16.0)  # -> 17: 58_824 + 17 rows <= 62_500
    """
    n, d, extra = num_embeddings, embedding_dim, extra_params
    if not ratio >= 1.0:
        raise ValueError(f"compression_ratio must be >= 1, got {ratio}")

    def reaches(rows: int) -> bool:
        total = rows * d + extra
        return total > 0 and n * d / total >= ratio

    limit = max(0, math.floor((n * d / ratio - extra) / d))
    while limit > 0 and not reaches(limit):  # guard float rounding: the ratio holds exactly
        limit -= 1
    while reaches(limit + 1):
        limit += 1
    p = _smallest_p_within_rows(n, limit) if limit > 0 else None
    if p is None:
        best_p, best = max_qr_compression_ratio(n, d, extra)
        what = " with per-entity weights" if extra else ""
        raise ValueError(
            f"compression_ratio {ratio} is unreachable with the quotient-remainder trick{what} for "
            f"num_embeddings={n}: at most {best:.4g} (num_collisions={best_p}, "
            f"{qr_num_rows(n, best_p)} rows)"
        )
    return p


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------
@dataclass
class QREmbeddingBagConfig(EmbeddingBagConfig):
    """An ``EmbeddingBagConfig`` compressed with the quotient-remainder trick.

    ``num_embeddings`` is the number of entities ``n``; give either
    ``num_collisions`` (``p``) or ``compression_ratio`` (``p`` derived by
    ``num_collisions_for_ratio``: the smallest ``p`` reaching the ratio).
    Entity ``i`` is ``Q[i // p] * R[i % p]``, or ``w[i] * Q[i // p] * R[i % p]``
    with ``entity_weights`` (``n`` more parameters, counted in the ratio).

    ``Q`` is initialised like a plain table of ``n`` rows (``init_fn``, default
    uniform ``+-sqrt(1/n)``), ``R`` to the constant ``remainder_init``, so that
    entities start at the scale of an uncompressed table (sharded tables use
    ``weight_init_min/max``, which give the same initialisation).

    Args:
        num_collisions (int): rows ``p`` of the remainder table (0: derive
            from ``compression_ratio``).
        compression_ratio (Optional[float]): target ``n*d / ((ceil(n/p) + p) * d)``.
        remainder_init (float): initial value of every entry of ``R``.
        entity_weights (bool): add MEmCom's per-entity scalar ``w`` (init 1).

    Example::

        items = QREmbeddingBagConfig(
            name="items", num_embeddings=1_000_000, embedding_dim=64,
            feature_names=["item_id", "history"], compression_ratio=16.0,
        )  # num_collisions=17: Q has 58_824 rows, R 17 (ratio 16.99)
    """

    num_collisions: int = 0
    compression_ratio: Optional[float] = None
    remainder_init: float = 1.0
    entity_weights: bool = False

    def __post_init__(self) -> None:
        where = check_table_config(self, "QR")
        if self.num_collisions and self.compression_ratio is not None:
            raise ValueError(f"{where}: give num_collisions or compression_ratio, not both")
        if not self.num_collisions:
            if self.compression_ratio is None:
                raise ValueError(f"{where}: give num_collisions or compression_ratio")
            try:
                self.num_collisions = num_collisions_for_ratio(
                    self.num_embeddings, self.compression_ratio, self.embedding_dim, self.num_entity_weights
                )
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
        if not 0 < self.num_collisions <= self.num_embeddings:
            raise ValueError(
                f"{where}: num_collisions must be in [1, num_embeddings={self.num_embeddings}], "
                f"got {self.num_collisions}"
            )
        super().__post_init__()

    @property
    def num_quotient_rows(self) -> int:
        """``ceil(n / p)``: rows of ``Q``."""
        return -(-self.num_embeddings // self.num_collisions)

    @property
    def num_remainder_rows(self) -> int:
        """``p``: rows of ``R``."""
        return self.num_collisions

    @property
    def num_entity_weights(self) -> int:
        """Per-entity scalars ``w``: ``n`` with ``entity_weights``, else 0."""
        return self.num_embeddings if self.entity_weights else 0



def qr_storage(name: str, num_embeddings: int, embedding_dim: int, num_collisions: int, entity_weights: bool
               ) -> TableStorage:
    """What a QR table stores (see ``modules/storage.py``): ``Q``, ``R`` and, for ``memcom_qr``, ``w``.

    ``w`` (``n``) is held in a ``ceil(n/p) x p`` grid next to ``Q``'s rows (entity ``i`` at
    ``(i // p, i mod p)``), so that sharding ``Q`` by rows carries each entity's scalar.
    """
    n, d, p = num_embeddings, embedding_dim, num_collisions
    quotient_rows = -(-n // p)
    tensors = [TableTensor("Q", (quotient_rows, d), is_row_table=True), TableTensor("R", (p, d), is_row_table=True)]
    if entity_weights:
        tensors.append(TableTensor("w", (n,), held_shape=(quotient_rows, p)))
    return TableStorage(name, n, d, tuple(tensors))


def _storage_of(config: QREmbeddingBagConfig) -> TableStorage:
    return qr_storage(config.name, config.num_embeddings, config.embedding_dim, config.num_collisions,
                      config.entity_weights)


register_storage(QREmbeddingBagConfig, _storage_of)


# ---------------------------------------------------------------------------
# Per-feature plan
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class QRFeatureSpec:
    """How one input feature is looked up.

    Args:
        feature (str): feature name.
        table (str): table name.
        num_embeddings (int): valid ids are ``[0, num_embeddings)``.
        num_collisions (int): ``p`` (0 for a plain table).
        embedding_dim (int): ``d``.
        mean_pooling (bool): whether the pooled sum is divided by the bag length.
        group (str): name of the ``EmbeddingCollection`` child holding its tables.
        entity_weights (bool): whether its table has per-entity weights ``w``.
    """

    feature: str
    table: str
    num_embeddings: int
    num_collisions: int
    embedding_dim: int
    mean_pooling: bool
    group: str
    entity_weights: bool = False

    @property
    def is_qr(self) -> bool:
        return self.num_collisions > 0

    @property
    def has_entity_weights(self) -> bool:
        return self.entity_weights

    def lookup_features(self) -> List[str]:
        """Features of the inner ``EmbeddingCollection``s this feature feeds."""
        if self.is_qr:
            return [self.feature + QUOTIENT_SUFFIX, self.feature + REMAINDER_SUFFIX]
        return [self.feature]


def _group_name(dim: int, first_dim: int) -> str:
    # TorchRec's EmbeddingCollection (sharded or not) needs one embedding dim
    # for all its tables: the first table's dim lives in `_embedding_collection`,
    # any other dim d in `_embedding_collection_d<d>`.
    return EMBEDDING_COLLECTION if dim == first_dim else f"{EMBEDDING_COLLECTION}_d{dim}"


def qr_feature_specs(tables: List[EmbeddingBagConfig]) -> Dict[str, QRFeatureSpec]:
    """Per-feature specs of a list of (QR or plain) table configs, in output order."""
    specs: Dict[str, QRFeatureSpec] = {}
    first_dim = tables[0].embedding_dim
    for t in tables:
        for f in t.feature_names or [t.name]:
            if f in specs:
                raise ValueError(
                    f"feature '{f}' is used by tables '{specs[f].table}' and '{t.name}'; "
                    "a feature may feed one table only"
                )
            specs[f] = QRFeatureSpec(
                feature=f,
                table=t.name,
                num_embeddings=t.num_embeddings,
                num_collisions=t.num_collisions if isinstance(t, QREmbeddingBagConfig) else 0,
                embedding_dim=t.embedding_dim,
                mean_pooling=t.pooling == PoolingType.MEAN,
                group=_group_name(t.embedding_dim, first_dim),
                entity_weights=isinstance(t, QREmbeddingBagConfig) and t.entity_weights,
            )
    return specs


def inner_table_configs(tables: List[EmbeddingBagConfig]) -> Dict[str, List[EmbeddingConfig]]:
    """Unpooled table configs of every ``EmbeddingCollection`` child.

    A QR table ``t`` becomes ``t__q`` (``ceil(n/p)`` rows, features
    ``<f>__q``) and ``t__r`` (``p`` rows, features ``<f>__r``); a plain table is
    kept under its own name and features. (``w`` is no table: the collection
    holds it as a flat per-entity parameter, ``_entity_weights.<t>``.)

    Returns:
        Dict[str, List[EmbeddingConfig]]: child name -> its tables.
    """
    first_dim = tables[0].embedding_dim
    groups: Dict[str, List[EmbeddingConfig]] = {}
    for t in tables:
        features = list(t.feature_names or [t.name])
        common = dict(embedding_dim=t.embedding_dim, data_type=t.data_type)
        if isinstance(t, QREmbeddingBagConfig):
            inner = [
                EmbeddingConfig(
                    name=t.name + QUOTIENT_SUFFIX,
                    num_embeddings=t.num_quotient_rows,
                    feature_names=[f + QUOTIENT_SUFFIX for f in features],
                    weight_init_min=t.get_weight_init_min(),
                    weight_init_max=t.get_weight_init_max(),
                    init_fn=t.init_fn,
                    **common,
                ),
                EmbeddingConfig(
                    name=t.name + REMAINDER_SUFFIX,
                    num_embeddings=t.num_remainder_rows,
                    feature_names=[f + REMAINDER_SUFFIX for f in features],
                    weight_init_min=t.remainder_init,
                    weight_init_max=t.remainder_init,
                    **common,
                ),
            ]
        else:
            inner = [
                EmbeddingConfig(
                    name=t.name,
                    num_embeddings=t.num_embeddings,
                    feature_names=features,
                    weight_init_min=t.weight_init_min,
                    weight_init_max=t.weight_init_max,
                    init_fn=t.init_fn,
                    **common,
                )
            ]
        groups.setdefault(_group_name(t.embedding_dim, first_dim), []).extend(inner)
    names = [c.name for g in groups.values() for c in g]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise ValueError(
            f"inner table name(s) {clash} are not unique: rename the table(s) ending in '__q'/'__r'"
        )
    inner_features = [f for g in groups.values() for c in g for f in c.feature_names]
    clash = sorted({f for f in inner_features if inner_features.count(f) > 1})
    if clash:
        raise ValueError(
            f"derived feature name(s) {clash} collide with other features: rename the feature(s) "
            "ending in '__q'/'__r'"
        )
    return groups
