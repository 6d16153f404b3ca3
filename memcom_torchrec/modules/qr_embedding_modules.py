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


def max_qr_compression_ratio(num_embeddings: int) -> Tuple[int, float]:
    """The most compressing ``p`` and its ratio.

    ``ceil(n/p) + p`` is smallest (``ceil(2 * sqrt(n))`` rows) near
    ``p = sqrt(n)``; several ``p`` may reach it, the smallest is returned
    (the same choice ``num_collisions_for_ratio`` makes).

    Args:
        num_embeddings (int): entities ``n``.

    Returns:
        Tuple[int, float]: the smallest ``p`` with the fewest rows, and ``n / rows``.
    """
    n = num_embeddings
    r = math.isqrt(n)
    min_rows = min(qr_num_rows(n, p) for p in range(max(1, r - 1), min(n, r + 2) + 1))
    p = _smallest_p_within_rows(n, min_rows)
    assert p is not None
    return p, n / min_rows


def num_collisions_for_ratio(num_embeddings: int, ratio: float) -> int:
    """The ``p`` a target compression ratio selects.

    Rule: the *smallest* ``p`` whose ratio reaches the target, i.e. the smallest
    ``p >= 1`` with ``n / (ceil(n/p) + p) >= ratio``. Among all tables that meet
    the memory budget it keeps the largest quotient table (fewest entities
    sharing a row of ``Q``). Integer form: with ``L = floor(n / ratio)`` the
    largest admissible row count, ``ceil(n/p) + p <= L`` iff
    ``p * (L - p) >= n``, so ``p`` is the smaller root of ``p^2 - L p + n``,
    rounded up. (The embedding dimension cancels out of the ratio.)

    Args:
        num_embeddings (int): entities ``n``.
        ratio (float): target ratio, ``1 <= ratio <= max_qr_compression_ratio(n)``.

    Returns:
        int: ``p``.

    Raises:
        ValueError: ``ratio < 1``, or ``ratio`` above the best QR can do for ``n``.

    Example::

        num_collisions_for_ratio(1_000_000, 16.0)  # -> 17: 58_824 + 17 rows <= 62_500
    """
    n = num_embeddings
    if not ratio >= 1.0:
        raise ValueError(f"compression_ratio must be >= 1, got {ratio}")
    limit = math.floor(n / ratio)
    while limit > 0 and n / limit < ratio:  # guard float rounding: n / L >= ratio exactly
        limit -= 1
    while n / (limit + 1) >= ratio:
        limit += 1
    p = _smallest_p_within_rows(n, limit)
    if p is None:
        best_p, best = max_qr_compression_ratio(n)
        raise ValueError(
            f"compression_ratio {ratio} is unreachable with the quotient-remainder trick for "
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
    Entity ``i`` is ``Q[i // p] * R[i % p]``.

    ``Q`` is initialised like a plain table of ``n`` rows (``init_fn``, default
    uniform ``+-sqrt(1/n)``), ``R`` to the constant ``remainder_init``, so that
    entities start at the scale of an uncompressed table (sharded tables use
    ``weight_init_min/max``, which give the same initialisation).

    Args:
        num_collisions (int): rows ``p`` of the remainder table (0: derive
            from ``compression_ratio``).
        compression_ratio (Optional[float]): target ``n*d / ((ceil(n/p) + p) * d)``.
        remainder_init (float): initial value of every entry of ``R``.

    Example::

        items = QREmbeddingBagConfig(
            name="items", num_embeddings=1_000_000, embedding_dim=64,
            feature_names=["item_id", "history"], compression_ratio=16.0,
        )  # num_collisions=17: Q has 58_824 rows, R 17 (ratio 16.99)
    """

    num_collisions: int = 0
    compression_ratio: Optional[float] = None
    remainder_init: float = 1.0

    def __post_init__(self) -> None:
        where = check_table_config(self, "QR")
        if self.num_collisions and self.compression_ratio is not None:
            raise ValueError(f"{where}: give num_collisions or compression_ratio, not both")
        if not self.num_collisions:
            if self.compression_ratio is None:
                raise ValueError(f"{where}: give num_collisions or compression_ratio")
            try:
                self.num_collisions = num_collisions_for_ratio(self.num_embeddings, self.compression_ratio)
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

    def achieved_compression_ratio(self) -> float:
        """Compression ratio of this table against the uncompressed ``n x d`` table."""
        return qr_compression_ratio(self.num_embeddings, self.embedding_dim, self.num_collisions)


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
    """

    feature: str
    table: str
    num_embeddings: int
    num_collisions: int
    embedding_dim: int
    mean_pooling: bool
    group: str

    @property
    def is_qr(self) -> bool:
        return self.num_collisions > 0

    def lookup_features(self) -> List[str]:
        """Features of the inner ``EmbeddingCollection`` this feature feeds."""
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
            )
    return specs


def inner_table_configs(tables: List[EmbeddingBagConfig]) -> Dict[str, List[EmbeddingConfig]]:
    """Unpooled table configs of every ``EmbeddingCollection`` child.

    A QR table ``t`` becomes ``t__q`` (``ceil(n/p)`` rows, features
    ``<f>__q``) and ``t__r`` (``p`` rows, features ``<f>__r``); a plain table is
    kept under its own name and features.

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
        raise ValueError(f"inner table name(s) {clash} are not unique: rename the table(s) ending in '__q'/'__r'")
    inner_features = [f for g in groups.values() for c in g for f in c.feature_names]
    clash = sorted({f for f in inner_features if inner_features.count(f) > 1})
    if clash:
        raise ValueError(
            f"derived feature name(s) {clash} collide with other features: rename the feature(s) "
            "ending in '__q'/'__r'"
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
    ``...<table>__r.weight`` (``R``), ``...<table>.weight`` (plain tables).
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

        pooled: Dict[str, torch.Tensor] = {}
        for group in self._group_names:
            # Derived ids in the child's own feature order (no permute when sharded).
            by_feature: Dict[str, torch.Tensor] = {}
            for f in self._group_features[group]:
                spec = self._feature_specs[f]
                k = key_index[f]
                seg = ids[offsets[k] : offsets[k + 1]]
                if spec.is_qr:
                    by_feature[f + QUOTIENT_SUFFIX] = torch.div(seg, spec.num_collisions, rounding_mode="floor")
                    by_feature[f + REMAINDER_SUFFIX] = torch.remainder(seg, spec.num_collisions)
                else:
                    by_feature[f] = seg
            inner_keys = self._group_inner_features[group]
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
            pooled.update(self._pool_group(group, out, lengths, offsets, key_index, weights, batch))
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
        lengths: torch.Tensor,
        offsets: List[int],
        key_index: Dict[str, int],
        weights: Optional[torch.Tensor],
        batch: int,
    ) -> Dict[str, torch.Tensor]:
        """Multiplies Q and R rows per id and segment-sums them into ``B x d`` bags."""
        feats = self._group_features[group]
        dim = self._feature_specs[feats[0]].embedding_dim
        per_id = []
        for f in feats:
            spec = self._feature_specs[f]
            if spec.is_qr:
                emb = sequences[f + QUOTIENT_SUFFIX].values() * sequences[f + REMAINDER_SUFFIX].values()
            else:
                emb = sequences[f].values()
            if weights is not None:
                k = key_index[f]
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
