"""The embedding methods, each defined once.

A method says how one logical table (a ``TableSpec``) is stored at a target
compression ratio. Its registry entry holds everything the rest of the package
asks about it:

- ``make_config``: the table config (its ratio rule lives in that config's
  solver: ``num_buckets_for_ratio`` for MEmCom and hashing,
  ``num_collisions_for_ratio`` for QR);
- ``max_compression_ratio``: the largest ratio it can reach for ``n`` entities
  of dimension ``d``;
- ``collection`` and ``sharder``: its unsharded collection and the sharder of its
  sharded twin, as ``"module:Class"`` paths resolved on use, so that ``modules/``
  does not import ``distributed/``;
- memory and ratios come from the storage description of the configs it builds
  (``modules/storage.py``'s ``table_storage``, read by ``table_memory``: the only
  description of a table's layout and the only source of ratios).

Models, training, the experiment grid and the reference sweep look a method up
here (``get_method``); none of them compares method names. The export needs no
method at all: every collection hands it a table's tensors by role
(``dense_tables``; the roles are listed in ``modules/storage.py``), and the slim
lookup computes by role. Adding a method with a new config family means writing its
config (with its ``register_storage``), its collection (and sharded twin) and
one ``register_method`` call; a method whose tensors have new roles also needs
a slim lookup for them.
"""

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType

from memcom_torchrec.modules.memcom_configs import (
    CLUSTERED,
    FREQUENCY,
    compression_ratio,
    max_variant_compression_ratio,
)
from memcom_torchrec.modules.lowrank_configs import max_lowrank_compression_ratio
from memcom_torchrec.modules.mixed_dim_configs import max_mixed_dim_compression_ratio
from memcom_torchrec.modules.qr_configs import max_qr_compression_ratio



@dataclass(frozen=True)
class TableSpec:
    """One logical table of a model, before any compression.

    Args:
        name (str): table name.
        num_embeddings (int): entities ``n``.
        feature_names (List[str]): features looked up in it.
        pooling (PoolingType): bag pooling.
    """

    name: str
    num_embeddings: int
    feature_names: List[str]
    pooling: PoolingType = PoolingType.SUM


@dataclass(frozen=True)
class EmbeddingMethod:
    """One embedding method (see the module docstring).

    Args:
        name (str): the name used in configs and on the command line.
        description (str): one line for help texts and reports.
        make_config (Callable[[TableSpec, int, float], EmbeddingBagConfig]): the
            table config for ``(spec, embedding_dim, ratio)``.
        max_compression_ratio (Callable[[int, int], float]): largest reachable
            ratio for ``(num_embeddings, embedding_dim)``.
        config_class (str): ``"module:Class"`` of the configs it builds.
        collection (str): ``"module:Class"`` of the unsharded collection.
        sharder (str): ``"module:Class"`` of the sharder of its sharded twin.
        compresses (bool): False only for the uncompressed baseline.
        memcom_family (bool): a trained scalar per entity (``w``) on a shared table:
            the methods the project's bars are about (reports single them out).
        warmup_method (str): a method trained first at the same ratio whose item
            vectors choose this method's stored assignment ("": none; see
            ``train.assignment``).
    """

    name: str
    description: str
    make_config: Callable[[TableSpec, int, float], EmbeddingBagConfig]
    max_compression_ratio: Callable[[int, int], float]
    config_class: str
    collection: str
    sharder: str
    compresses: bool = True
    memcom_family: bool = False
    warmup_method: str = ""

    def table_config(self, spec: TableSpec, embedding_dim: int, ratio: float) -> EmbeddingBagConfig:
        """The config of ``spec`` at ``ratio``.

        Raises:
            ValueError: naming the table, the ratio and this method's maximum, if
                the ratio is out of reach.
        """
        if not self.compresses:
            return make_plain_config(spec, embedding_dim)
        reason = self.unreachable(spec.num_embeddings, embedding_dim, ratio)
        if reason is not None:
            raise ValueError(f"table '{spec.name}': {reason}")
        return self.make_config(spec, embedding_dim, ratio)

    def unreachable(self, num_embeddings: int, embedding_dim: int, ratio: float) -> Optional[str]:
        """Why this method cannot store ``n`` entities at ``ratio`` (``None`` if it can)."""
        if not self.compresses:
            return None
        if not ratio > 1.0:
            return f"method '{self.name}' needs compression_ratio > 1, got {ratio}"
        best = self.max_compression_ratio(num_embeddings, embedding_dim)
        if ratio > best:
            return (
                f"compression_ratio {ratio:g} is unreachable with method '{self.name}' for "
                f"num_embeddings={num_embeddings}, embedding_dim={embedding_dim}: at most {best:.4g}"
            )
        return None

    def config_type(self) -> type:
        """The class of the configs it builds."""
        return _resolve(self.config_class)

    def sharder_class(self) -> type:
        """The sharder class of the sharded twin."""
        return _resolve(self.sharder)


def collection_class_for(tables: List[EmbeddingBagConfig]) -> type:
    """The collection that stores ``tables`` (plain tables fit in every collection).

    Raises:
        ValueError: if the tables need two different collections (e.g. MEmCom and QR tables).
    """
    needed = {
        m.collection
        for m in _METHODS.values()
        if m.compresses and any(isinstance(t, m.config_type()) for t in tables)
    }
    if len(needed) > 1:
        raise ValueError(f"tables {[t.name for t in tables]} need several collections {sorted(needed)}; use one method")
    return _resolve(needed.pop() if needed else UNCOMPRESSED.collection)


def _resolve(path: str) -> type:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


_METHODS: Dict[str, EmbeddingMethod] = {}


def register_method(method: EmbeddingMethod) -> EmbeddingMethod:
    """Adds a method to the registry (a name is registered once)."""
    if method.name in _METHODS:
        raise ValueError(f"embedding method '{method.name}' is already registered")
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> EmbeddingMethod:
    """The registered method called ``name``.

    Raises:
        ValueError: naming the unknown method and the registered ones.
    """
    if name not in _METHODS:
        raise ValueError(f"unknown embedding method '{name}'; choose one of {method_names()}")
    return _METHODS[name]


def method_names() -> List[str]:
    """Registered method names, in registration order."""
    return list(_METHODS)


def method_sharders(fused_params: Dict[str, Any]) -> List[Any]:
    """One sharder per sharded twin of the registered methods (for ``DistributedModelParallel``).

    Args:
        fused_params (Dict[str, Any]): the tables' fused optimizer (``optimizer``, ``learning_rate``...).
    """
    classes = list(dict.fromkeys(m.sharder_class() for m in _METHODS.values()))
    return [cls(fused_params=fused_params) for cls in classes]


# ----------------------------------------------------------------- the methods
_MEMCOM_CONFIG = "memcom_torchrec.modules.memcom_configs:MEmComEmbeddingBagConfig"
_QR_CONFIG = "memcom_torchrec.modules.qr_configs:QREmbeddingBagConfig"
_MEMCOM_COLLECTION = "memcom_torchrec.modules.memcom_embedding_modules:MEmComEmbeddingBagCollection"
_MEMCOM_SHARDER = "memcom_torchrec.distributed.memcom_embeddingbag:MEmComEmbeddingBagCollectionSharder"
_QR_COLLECTION = "memcom_torchrec.modules.qr_embedding_modules:QREmbeddingBagCollection"
_QR_SHARDER = "memcom_torchrec.distributed.qr_embeddingbag:QREmbeddingBagCollectionSharder"


def make_plain_config(spec: TableSpec, embedding_dim: int, ratio: float = 1.0) -> EmbeddingBagConfig:
    """An uncompressed ``n x d`` table."""
    return EmbeddingBagConfig(
        name=spec.name,
        num_embeddings=spec.num_embeddings,
        embedding_dim=embedding_dim,
        feature_names=list(spec.feature_names),
        pooling=spec.pooling,
    )


def _compressed_config(config_class: str, **options: Any) -> Callable[[TableSpec, int, float], EmbeddingBagConfig]:
    """A ``make_config`` building ``config_class`` at the ratio, with fixed ``options``."""

    def make(spec: TableSpec, embedding_dim: int, ratio: float) -> EmbeddingBagConfig:
        return _resolve(config_class)(
            name=spec.name,
            num_embeddings=spec.num_embeddings,
            embedding_dim=embedding_dim,
            feature_names=list(spec.feature_names),
            pooling=spec.pooling,
            compression_ratio=ratio,
            **options,
        )

    return make


def _variant_max_ratio(**options: Any) -> Callable[[int, int], float]:
    def best(n: int, d: int) -> float:
        return max_variant_compression_ratio(n, d, **options)

    return best


# The frequency head's share of U's rows (not searched: the same budget as every method, see docs/RESULTS.md).
HEAD_FRACTION: float = 0.25


def _qr_max_ratio(entity_weights: bool) -> Callable[[int, int], float]:
    def best(n: int, d: int) -> float:
        return max_qr_compression_ratio(n, d, n if entity_weights else 0)[1]

    return best


UNCOMPRESSED: EmbeddingMethod = register_method(EmbeddingMethod(
    name="uncompressed",
    description="TorchRec's own n x d table",
    make_config=make_plain_config,
    max_compression_ratio=lambda n, d: 1.0,
    config_class="torchrec.modules.embedding_configs:EmbeddingBagConfig",
    collection="torchrec.modules.embedding_modules:EmbeddingBagCollection",
    sharder="torchrec.distributed.embeddingbag:EmbeddingBagCollectionSharder",
    compresses=False,
))
HASHING: EmbeddingMethod = register_method(EmbeddingMethod(
    name="hashing",
    description="the hashing trick, U[i mod m] (MEmCom with w frozen at 1, none stored)",
    make_config=_compressed_config(_MEMCOM_CONFIG, train_entity_weights=False),
    max_compression_ratio=lambda n, d: float(n),  # one row for all
    config_class=_MEMCOM_CONFIG,
    collection=_MEMCOM_COLLECTION,
    sharder=_MEMCOM_SHARDER,
))
MEMCOM: EmbeddingMethod = register_method(EmbeddingMethod(
    name="memcom",
    description="MEmCom, w[i] * U[i mod m]",
    make_config=_compressed_config(_MEMCOM_CONFIG, train_entity_weights=True),
    max_compression_ratio=lambda n, d: compression_ratio(n, d, 1),  # one row of U plus n scalars
    config_class=_MEMCOM_CONFIG,
    collection=_MEMCOM_COLLECTION,
    sharder=_MEMCOM_SHARDER,
    memcom_family=True,
))
QR: EmbeddingMethod = register_method(EmbeddingMethod(
    name="qr",
    description="quotient-remainder, Q[i // p] * R[i mod p] (element-wise)",
    make_config=_compressed_config(_QR_CONFIG, entity_weights=False),
    max_compression_ratio=_qr_max_ratio(entity_weights=False),
    config_class=_QR_CONFIG,
    collection=_QR_COLLECTION,
    sharder=_QR_SHARDER,
))
MEMCOM_QR: EmbeddingMethod = register_method(EmbeddingMethod(
    name="memcom_qr",
    description="MEmCom's w on a quotient-remainder pair, w[i] * Q[i // p] * R[i mod p] (beyond the paper)",
    make_config=_compressed_config(_QR_CONFIG, entity_weights=True),
    max_compression_ratio=_qr_max_ratio(entity_weights=True),
    config_class=_QR_CONFIG,
    collection=_QR_COLLECTION,
    sharder=_QR_SHARDER,
    memcom_family=True,
))
def _memcom_variant(name: str, description: str, warmup_method: str = "", **options: Any) -> EmbeddingMethod:
    """Registers a MEmCom-family variant: a MEmCom config with ``options``, in MEmCom's collection and sharder."""
    return register_method(EmbeddingMethod(
        name=name,
        description=description,
        make_config=_compressed_config(_MEMCOM_CONFIG, **options),
        max_compression_ratio=_variant_max_ratio(**options),
        config_class=_MEMCOM_CONFIG,
        collection=_MEMCOM_COLLECTION,
        sharder=_MEMCOM_SHARDER,
        memcom_family=True,
        warmup_method=warmup_method,
    ))


MEMCOM_2HASH: EmbeddingMethod = _memcom_variant(
    "memcom_2hash",
    "Hash Embeddings' k=2 case, w[i,0] U[i mod m] + w[i,1] U[h2(i)] (two scalars per entity)",
    num_hashes=2,
)
MEMCOM_FREQ: EmbeddingMethod = _memcom_variant(
    "memcom_freq",
    "MEmCom with a frequency-aware head: the most frequent items alone in a row of U (stored assignment)",
    assignment=FREQUENCY,
    head_fraction=HEAD_FRACTION,
)
MEMCOM_CLUSTERED: EmbeddingMethod = _memcom_variant(
    "memcom_clustered",
    "MEmCom on a learned assignment: items clustered on a memcom_2hash warm-up (stored assignment)",
    warmup_method=MEMCOM_2HASH.name,
    assignment=CLUSTERED,
)
MEMCOM_CLUSTERED_2HASH: EmbeddingMethod = _memcom_variant(
    "memcom_clustered_2hash",
    "a clustered row plus a hashed row, w[i,0] U[c(i)] + w[i,1] U[h2(i)] (CCE-style; stored assignment)",
    warmup_method=MEMCOM_2HASH.name,
    assignment=CLUSTERED,
    num_hashes=2,
)
LOWRANK: EmbeddingMethod = register_method(EmbeddingMethod(
    name="lowrank",
    description="a low-rank table, P A[i]: n x k rows and a shared k -> d projection (k a multiple of 4)",
    make_config=_compressed_config("memcom_torchrec.modules.lowrank_configs:LowRankEmbeddingBagConfig"),
    max_compression_ratio=max_lowrank_compression_ratio,
    config_class="memcom_torchrec.modules.lowrank_configs:LowRankEmbeddingBagConfig",
    collection="memcom_torchrec.modules.lowrank_embedding_modules:LowRankEmbeddingBagCollection",
    sharder=_MEMCOM_SHARDER,  # shards the collection's inner MEmCom collection; P stays a dense layer
))
MIXED_DIM: EmbeddingMethod = register_method(EmbeddingMethod(
    name="mixed_dim",
    description="mixed-dimension (Ginart et al.): full rows for the most frequent entities, P-projected narrow "
                "rows for the rest (stored slots)",
    make_config=_compressed_config("memcom_torchrec.modules.mixed_dim_configs:MixedDimEmbeddingBagConfig"),
    max_compression_ratio=max_mixed_dim_compression_ratio,
    config_class="memcom_torchrec.modules.mixed_dim_configs:MixedDimEmbeddingBagConfig",
    collection="memcom_torchrec.modules.mixed_dim_embedding_modules:MixedDimEmbeddingBagCollection",
    sharder=_MEMCOM_SHARDER,  # shards the collection's inner MEmCom collection; P stays a dense layer
))
