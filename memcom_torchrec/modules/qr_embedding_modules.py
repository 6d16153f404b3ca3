"""The quotient-remainder (QR) trick: a compression baseline next to MEmCom.

Shi et al., "Compositional Embeddings Using Complementary Partitions for
Memory-Efficient Recommendation Systems" (KDD 2020). A table of ``n`` entities
is replaced by a quotient table ``Q`` of ``ceil(n / p)`` rows and a remainder
table ``R`` of ``p`` rows (``p`` = ``num_collisions``); entity ``i`` is embedded
as ``Q[i // p] * R[i % p]`` (element-wise product, the paper's best operation).
The pair ``(i // p, i % p)`` is unique per entity, so every entity still gets a
vector of its own. Compression ratio: ``n*d / ((ceil(n/p) + p) * d)``, at most
``n / ceil(2 * sqrt(n))`` (reached near ``p = sqrt(n)``).

A bag pools a sum of per-entity *products*, which a pooled lookup
(``EmbeddingBag``) cannot compute. ``QREmbeddingBagCollection`` therefore
wraps TorchRec's unpooled ``EmbeddingCollection`` (child
``_embedding_collection``) holding ``Q`` and ``R`` as ordinary tables
(``<table>__q``, ``<table>__r``, fed by derived features ``<feature>__q`` /
``<feature>__r``), multiplies the two sequence embeddings and segment-sums them
per bag. ``DistributedModelParallel`` with ``get_default_sharders()`` shards
that child with TorchRec's stock ``EmbeddingCollectionSharder`` onto fused
FBGEMM TBE kernels: no custom sharder is needed.

``entity_weights=True`` (method ``memcom_qr``, a MEmCom variant beyond the
paper) adds a trainable scalar per entity on top of the pair:
``w[i] * Q[i // p] * R[i % p]``. ``w`` is a third inner table ``<table>__w``
packed 4 scalars per row (FBGEMM TBE dims are multiples of 4: ``w[i]`` is row
``i // 4``, column ``i % 4``, initialised to 1), looked up unpooled by the
derived feature ``<feature>__w`` from the child ``_embedding_collection_d4``.
So ``w`` is sharded, checkpointed and trained by the same fused FBGEMM kernels
and optimizer as ``Q`` and ``R`` (a row-wise optimizer shares one state over
the 4 scalars of a row).
"""

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torchrec.distributed.types import Awaitable, ShardedModule
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface, EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from memcom_torchrec.modules.validation import check_table_config, raise_on_any_rank, validate_feature_specs

QUOTIENT_SUFFIX: str = "__q"
REMAINDER_SUFFIX: str = "__r"
ENTITY_WEIGHT_SUFFIX: str = "__w"
ENTITY_WEIGHTS_PER_ROW: int = 4  # FBGEMM TBE: embedding dims are multiples of 4
EMBEDDING_COLLECTION: str = "_embedding_collection"


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


def qr_compression_ratio(num_embeddings: int, embedding_dim: int, num_collisions: int) -> float:
    """Compression ratio of a QR table against the uncompressed ``n x d`` table.

    Args:
        num_embeddings (int): entities ``n``.
        embedding_dim (int): embedding dimension ``d``.
        num_collisions (int): rows ``p`` of the remainder table.

    Returns:
        float: ``n*d / ((ceil(n/p) + p) * d)``.
    """
    rows = qr_num_rows(num_embeddings, num_collisions)
    return num_embeddings * embedding_dim / (rows * embedding_dim)


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
    def num_rows(self) -> int:
        """``ceil(n / p) + p``: rows stored."""
        return qr_num_rows(self.num_embeddings, self.num_collisions)

    @property
    def num_entity_weights(self) -> int:
        """Per-entity scalars ``w``: ``n`` with ``entity_weights``, else 0."""
        return self.num_embeddings if self.entity_weights else 0

    @property
    def num_entity_weight_rows(self) -> int:
        """Rows of the packed ``w`` table (``ceil(n / 4)``), 0 without ``entity_weights``."""
        return -(-self.num_entity_weights // ENTITY_WEIGHTS_PER_ROW)

    @property
    def num_parameters(self) -> int:
        """``(ceil(n/p) + p) * d`` plus ``n`` with ``entity_weights``."""
        return self.num_rows * self.embedding_dim + self.num_entity_weights

    def achieved_compression_ratio(self) -> float:
        """Compression ratio of this table against the uncompressed ``n x d`` table."""
        return self.num_embeddings * self.embedding_dim / self.num_parameters


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
        entity_weight_group (str): child holding its packed ``w`` table ("" if none).
    """

    feature: str
    table: str
    num_embeddings: int
    num_collisions: int
    embedding_dim: int
    mean_pooling: bool
    group: str
    entity_weight_group: str = ""

    @property
    def is_qr(self) -> bool:
        return self.num_collisions > 0

    @property
    def has_entity_weights(self) -> bool:
        return bool(self.entity_weight_group)

    def lookup_features(self) -> List[str]:
        """Features of the inner ``EmbeddingCollection``s this feature feeds."""
        if self.is_qr:
            weights = [self.feature + ENTITY_WEIGHT_SUFFIX] if self.has_entity_weights else []
            return [self.feature + QUOTIENT_SUFFIX, self.feature + REMAINDER_SUFFIX, *weights]
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
                entity_weight_group=(
                    _group_name(ENTITY_WEIGHTS_PER_ROW, first_dim)
                    if isinstance(t, QREmbeddingBagConfig) and t.entity_weights
                    else ""
                ),
            )
    return specs


def inner_table_configs(tables: List[EmbeddingBagConfig]) -> Dict[str, List[EmbeddingConfig]]:
    """Unpooled table configs of every ``EmbeddingCollection`` child.

    A QR table ``t`` becomes ``t__q`` (``ceil(n/p)`` rows, features
    ``<f>__q``) and ``t__r`` (``p`` rows, features ``<f>__r``), plus ``t__w``
    (``ceil(n/4)`` rows of dim 4, features ``<f>__w``, in the dim-4 child) with
    ``entity_weights``; a plain table is kept under its own name and features.

    Returns:
        Dict[str, List[EmbeddingConfig]]: child name -> its tables.
    """
    first_dim = tables[0].embedding_dim
    groups: Dict[str, List[EmbeddingConfig]] = {}
    for t in tables:
        features = list(t.feature_names or [t.name])
        common = dict(embedding_dim=t.embedding_dim, data_type=t.data_type)
        weights: List[EmbeddingConfig] = []
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
            if t.entity_weights:
                weights = [
                    EmbeddingConfig(
                        name=t.name + ENTITY_WEIGHT_SUFFIX,
                        num_embeddings=t.num_entity_weight_rows,
                        embedding_dim=ENTITY_WEIGHTS_PER_ROW,
                        feature_names=[f + ENTITY_WEIGHT_SUFFIX for f in features],
                        weight_init_min=1.0,
                        weight_init_max=1.0,
                        data_type=t.data_type,
                    )
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
        if weights:
            groups.setdefault(_group_name(ENTITY_WEIGHTS_PER_ROW, first_dim), []).extend(weights)
    names = [c.name for g in groups.values() for c in g]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise ValueError(
            f"inner table name(s) {clash} are not unique: rename the table(s) ending in '__q'/'__r'/'__w'"
        )
    inner_features = [f for g in groups.values() for c in g for f in c.feature_names]
    clash = sorted({f for f in inner_features if inner_features.count(f) > 1})
    if clash:
        raise ValueError(
            f"derived feature name(s) {clash} collide with other features: rename the feature(s) "
            "ending in '__q'/'__r'/'__w'"
        )
    return groups


# ---------------------------------------------------------------------------
# Module
# ---------------------------------------------------------------------------
class QREmbeddingBagCollection(EmbeddingBagCollectionInterface):
    """EmbeddingBagCollection whose tables may be quotient-remainder compressed.

    Entity ``i`` of a QR table is ``Q[i // p] * R[i % p]``; a bag pools
    ``sum_j c_j Q[i_j // p] * R[i_j % p]`` (``c_j`` the input's own weights if
    ``is_weighted``), divided by the bag length for MEAN pooling; empty bags
    give zeros. Plain ``EmbeddingBagConfig`` tables pool as in TorchRec.
    Parameters: ``_embedding_collection.embeddings.<table>__q.weight`` (``Q``),
    ``...<table>__r.weight`` (``R``), ``...<table>.weight`` (plain tables), and
    with ``entity_weights`` ``_embedding_collection_d4.embeddings.<table>__w.weight``
    (``w`` packed 4 per row; entity ``i`` is then ``w[i] * Q[i // p] * R[i % p]``).
    Tables whose ``embedding_dim`` differs from the first table's live in a child
    ``_embedding_collection_d<dim>`` (TorchRec's ``EmbeddingCollection`` holds a
    single dim). Sharded with ``DistributedModelParallel`` and
    ``get_default_sharders()``, those children become TorchRec
    ``ShardedEmbeddingCollection``s on fused FBGEMM kernels with the same
    parameter names; this module then pools their (awaited) sequence outputs.

    Args:
        tables (List[EmbeddingBagConfig]): QR and/or plain table configs.
        is_weighted (bool): whether input KJTs carry per-id weights.
        device (Optional[torch.device]): device, ``meta`` for lazy init.
        validate_inputs (bool): check ids before the lookup (when sharded: one
            extra all-reduce per batch so every rank raises together).

    Example::

        ebc = QREmbeddingBagCollection(tables=[
            QREmbeddingBagConfig(name="items", num_embeddings=10_000,
                embedding_dim=64, feature_names=["history"], compression_ratio=16),
            EmbeddingBagConfig(name="users", num_embeddings=1_000,
                embedding_dim=64, feature_names=["user_id"]),
        ])
        kt = ebc(kjt)  # KeyedTensor with keys ["history", "user_id"]
    """

    def __init__(
        self,
        tables: List[EmbeddingBagConfig],
        is_weighted: bool = False,
        device: Optional[Union[str, torch.device]] = None,
        validate_inputs: bool = True,
    ) -> None:
        super().__init__()
        if not tables:
            raise ValueError("QREmbeddingBagCollection needs at least one table")
        names = [t.name for t in tables]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate table names {names}")
        self._embedding_bag_configs: List[EmbeddingBagConfig] = tables
        self._is_weighted = is_weighted
        self._validate_inputs = validate_inputs
        self._device: torch.device = torch.device(device) if device is not None else torch.device("cpu")
        self._feature_specs: Dict[str, QRFeatureSpec] = qr_feature_specs(tables)
        groups = inner_table_configs(tables)
        self._group_names: List[str] = list(groups)
        for name, configs in groups.items():
            self.add_module(name, EmbeddingCollection(tables=configs, device=self._device))
        # Output: features in table order (as TorchRec's EBC); pooling runs per group.
        self._embedding_names: List[str] = list(self._feature_specs)
        self._lengths_per_embedding: List[int] = [s.embedding_dim for s in self._feature_specs.values()]
        self._group_features: Dict[str, List[str]] = {
            g: [f for f, s in self._feature_specs.items() if s.group == g] for g in self._group_names
        }
        self._group_inner_features: Dict[str, List[str]] = {
            g: [f for c in configs for f in c.feature_names] for g, configs in groups.items()
        }
        self._outer_feature: Dict[str, str] = {
            inner: f for f, s in self._feature_specs.items() for inner in s.lookup_features()
        }

    # ------------------------------------------------------------------ API
    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        """Returns: the table configs this collection was built from."""
        return self._embedding_bag_configs

    def is_weighted(self) -> bool:
        """Returns: whether input KJTs carry per-id weights."""
        return self._is_weighted

    @property
    def device(self) -> torch.device:
        return self._device

    def feature_specs(self) -> Dict[str, QRFeatureSpec]:
        """Returns: per-feature lookup specs, in output order."""
        return self._feature_specs

    def reset_parameters(self) -> None:
        """Re-initialises ``Q`` and plain tables (``init_fn``) and sets ``R`` to ``remainder_init``."""
        if self._device.type == "meta":
            return
        for name in self._group_names:
            child = getattr(self, name)
            if isinstance(child, EmbeddingCollection):
                child.reset_parameters()

    def qr_parameters(self, table_name: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """The two tables of a QR table (unsharded module).

        Args:
            table_name (str): a QR table.

        Returns:
            Tuple[torch.Tensor, torch.Tensor]: ``Q`` (``ceil(n/p) x d``) and
            ``R`` (``p x d``); entity ``i`` is ``Q[i // p] * R[i % p]``.

        Raises:
            KeyError: not a QR table of this collection.
            RuntimeError: the collection is sharded (use its state_dict).
        """
        config = next((t for t in self._embedding_bag_configs if t.name == table_name), None)
        if not isinstance(config, QREmbeddingBagConfig):
            raise KeyError(f"'{table_name}' is not a QR table of this collection")
        child = getattr(self, self._feature_specs[config.feature_names[0]].group)
        if not isinstance(child, EmbeddingCollection):
            raise RuntimeError(
                f"QR table '{table_name}' is sharded: read Q and R from the state_dict "
                "(memcom_torchrec.distributed.state_dict_utils.gather_unsharded_state_dict)"
            )
        return (
            child.embeddings[table_name + QUOTIENT_SUFFIX].weight,
            child.embeddings[table_name + REMAINDER_SUFFIX].weight,
        )

    def entity_weights(self, table_name: str) -> torch.Tensor:
        """The per-entity weights ``w`` of a QR table built with ``entity_weights`` (unsharded module).

        Args:
            table_name (str): a QR table with ``entity_weights``.

        Returns:
            torch.Tensor: ``w`` (``n`` values), a view of the packed
            ``ceil(n/4) x 4`` table ``<table>__w``.

        Raises:
            KeyError: not a QR table with per-entity weights.
            RuntimeError: the collection is sharded (use its state_dict).
        """
        config = next((t for t in self._embedding_bag_configs if t.name == table_name), None)
        if not isinstance(config, QREmbeddingBagConfig) or not config.entity_weights:
            raise KeyError(f"'{table_name}' is not a QR table with entity_weights in this collection")
        child = getattr(self, self._feature_specs[config.feature_names[0]].entity_weight_group)
        if not isinstance(child, EmbeddingCollection):
            raise RuntimeError(f"QR table '{table_name}' is sharded: read its w from the state_dict")
        return child.embeddings[table_name + ENTITY_WEIGHT_SUFFIX].weight.view(-1)[: config.num_embeddings]

    # -------------------------------------------------------------- forward
    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pools the embeddings of every feature.

        Args:
            features (KeyedJaggedTensor): ids (and weights if ``is_weighted``) of
                every feature of the collection.

        Returns:
            KeyedTensor: one pooled ``B x d`` block per feature, in table order.

        Raises:
            ValueError: on unknown/missing keys, ids out of range, bad dtypes.
        """
        if self._validate_inputs:
            self._check_input(features)
        keys = features.keys()
        batch = features.stride()
        if batch == 0:  # TorchRec's EmbeddingCollection cannot split an empty batch
            return self._empty_output()
        lengths = features.lengths().view(len(keys), batch)
        offsets = features.offset_per_key()
        key_index = {k: i for i, k in enumerate(keys)}
        ids = features.values().long()
        weights = features.weights() if self._is_weighted else None

        # Derived ids of every inner feature.
        by_feature: Dict[str, torch.Tensor] = {}
        for f, spec in self._feature_specs.items():
            k = key_index[f]
            seg = ids[offsets[k] : offsets[k + 1]]
            if spec.is_qr:
                by_feature[f + QUOTIENT_SUFFIX] = torch.div(seg, spec.num_collisions, rounding_mode="floor")
                by_feature[f + REMAINDER_SUFFIX] = torch.remainder(seg, spec.num_collisions)
                if spec.has_entity_weights:
                    by_feature[f + ENTITY_WEIGHT_SUFFIX] = torch.div(seg, ENTITY_WEIGHTS_PER_ROW, rounding_mode="floor")
            else:
                by_feature[f] = seg
        sequences: Dict[str, JaggedTensor] = {}
        for group in self._group_names:
            inner_keys = self._group_inner_features[group]  # the child's own order: no permute when sharded
            inner_lengths = [lengths[key_index[self._outer_feature[g]]] for g in inner_keys]
            inner_kjt = KeyedJaggedTensor(
                keys=inner_keys,
                values=torch.cat([by_feature[g] for g in inner_keys]),
                lengths=torch.cat(inner_lengths),
                stride=batch,
            )
            out = getattr(self, group)(inner_kjt)
            if isinstance(out, Awaitable):  # sharded child: LazyAwaitable[Dict[str, JaggedTensor]]
                out = out.wait()
            sequences.update(out)
        pooled: Dict[str, torch.Tensor] = {}
        for group in self._group_names:
            if self._group_features[group]:  # a child may hold only packed w tables
                pooled.update(self._pool_group(group, sequences, ids, lengths, offsets, key_index, weights, batch))
        values = torch.cat([pooled[f] for f in self._embedding_names], dim=1)
        return KeyedTensor(
            keys=self._embedding_names, length_per_key=self._lengths_per_embedding, values=values
        )

    def _empty_output(self) -> KeyedTensor:
        """``0 x sum(d)`` output, connected to the (unsharded) tables for autograd."""
        blocks = []
        for f, spec in self._feature_specs.items():
            child = getattr(self, spec.group)
            table = spec.table + QUOTIENT_SUFFIX if spec.is_qr else spec.table
            if isinstance(child, EmbeddingCollection):
                blocks.append(child.embeddings[table].weight[:0].float())
            else:
                blocks.append(torch.zeros(0, spec.embedding_dim, device=self._device))
        return KeyedTensor(
            keys=self._embedding_names, length_per_key=self._lengths_per_embedding, values=torch.cat(blocks, 1)
        )

    def _pool_group(
        self,
        group: str,
        sequences: Dict[str, JaggedTensor],
        ids: torch.Tensor,
        lengths: torch.Tensor,
        offsets: List[int],
        key_index: Dict[str, int],
        weights: Optional[torch.Tensor],
        batch: int,
    ) -> Dict[str, torch.Tensor]:
        """Multiplies Q and R rows (and ``w``) per id and segment-sums them into ``B x d`` bags."""
        feats = self._group_features[group]
        dim = self._feature_specs[feats[0]].embedding_dim
        per_id = []
        for f in feats:
            spec = self._feature_specs[f]
            k = key_index[f]
            if spec.is_qr:
                emb = sequences[f + QUOTIENT_SUFFIX].values() * sequences[f + REMAINDER_SUFFIX].values()
                if spec.has_entity_weights:  # w[i] is column i % 4 of packed row i // 4
                    column = torch.remainder(ids[offsets[k] : offsets[k + 1]], ENTITY_WEIGHTS_PER_ROW)
                    emb = emb * sequences[f + ENTITY_WEIGHT_SUFFIX].values().gather(1, column.unsqueeze(1))
            else:
                emb = sequences[f].values()
            if weights is not None:
                emb = emb * weights[offsets[k] : offsets[k + 1]].to(emb.dtype).unsqueeze(1)
            per_id.append(emb)
        flat = torch.cat(per_id)
        group_lengths = torch.stack([lengths[key_index[f]] for f in feats])  # F_g x B
        segment = torch.repeat_interleave(
            torch.arange(len(feats) * batch, device=flat.device),
            group_lengths.reshape(-1),
            output_size=flat.shape[0],
        )
        sums = torch.zeros(len(feats) * batch, dim, dtype=flat.dtype, device=flat.device).index_add(
            0, segment, flat
        )
        sums = sums.view(len(feats), batch, dim)
        out: Dict[str, torch.Tensor] = {}
        for j, f in enumerate(feats):
            bag = sums[j]
            if self._feature_specs[f].mean_pooling:
                bag = bag / group_lengths[j].clamp(min=1).to(bag.dtype).unsqueeze(1)
            out[f] = bag
        return out

    def _check_input(self, features: KeyedJaggedTensor) -> None:
        """Raises a ``ValueError`` naming the feature and value; all ranks raise together when sharded."""
        error = validate_feature_specs(features, self._feature_specs, self._is_weighted)
        device = features.values().device if isinstance(features, KeyedJaggedTensor) else torch.device("cpu")
        pg = self._process_group()
        if error is None and pg is not None and features.stride() == 0:
            # The unsharded module answers an empty batch locally; a sharded child
            # would leave the other ranks waiting in its all-to-all.
            error = "empty batch on a sharded QR collection: pad it (memcom_torchrec.data.pad_batch)"
        raise_on_any_rank(error, pg, device, features.stride() if error is None else None)

    def _process_group(self) -> Optional[dist.ProcessGroup]:
        """The process group of a sharded child, ``None`` when unsharded."""
        for name in self._group_names:
            child = getattr(self, name)
            if isinstance(child, ShardedModule):
                env = getattr(child, "_env", None)
                return getattr(env, "process_group", None) or (dist.group.WORLD if dist.is_initialized() else None)
        return None
