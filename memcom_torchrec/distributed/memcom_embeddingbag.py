"""Sharded MEmCom EmbeddingBagCollection and its sharder.

Design (in the style of TorchRec's sharded managed-collision EBC): the sharded
module wraps a stock ``ShardedEmbeddingBagCollection`` holding every table's
``U`` (or plain table) on fused FBGEMM kernels, and adds the per-entity weights
``w`` around it:

1. ``input_dist``: validate the input (device-side counts, one host read of
   one all-reduced flag per step, so a bad batch on one rank raises everywhere
   instead of hanging the others), then start TorchRec's input all-to-all.
   Ids of table-wise MEmCom tables travel as they are and are hashed on the
   rank that owns the table, so a step moves exactly the bytes of a stock
   unweighted EBC. Row-wise tables are routed by their row of ``U``: their
   ids are hashed to ``i mod m`` first and the quotient ``i // m`` travels as
   the KJT's per-id weight (exact in float32 below 2**24).
2. ``compute``: on the shard that owns row ``h`` of ``U``, look up
   ``w[h, q]`` in the local slice of the ``(m, Q)`` grid and feed it as
   FBGEMM's per-sample weights. ``w``'s optimizer step (``memcom_torchrec.optim``)
   runs in backward, from one of two gradients (``lookup_path``):
   ``"weighted_tbe"``, FBGEMM's per-sample-weight gradient (the CUDA default),
   or ``"gathered"``, ``<U[h], grad_bag>`` from row gathers before FBGEMM's
   backward (``entity_weight_gradient``; the CPU default, where FBGEMM's
   per-sample-weight gradient kernel is as costly as the lookup).
3. ``output_dist``: the stock pooled all-to-all, then mean pooling.

``w`` is row-sharded exactly like ``U`` (TW: whole table on one rank; RW/TWRW:
the same row blocks), appears in ``state_dict`` as a ``ShardedTensor`` named
``_entity_weights.<table>`` like the unsharded module, and its optimizer state
sits in ``fused_optimizer``.

The MEmCom-family variants (``memcom_configs``: a second hash, a stored
assignment) map ids to cells of the same grid, so the layout, the plan and the
update are MEmCom's. Their ids are always mapped before the all-to-all (like
row-wise tables, whatever the sharding): every rank holds the (small, replicated)
stored assignment as ``_assignments.<table>``, a plain tensor in ``state_dict``
that DCP saves once, and a second hash turns each id into two ids of the bag.
A stored assignment is set before training (``set_assignment``, or a loaded
checkpoint); changing it while training would move entities between rows
owned by different ranks, which this module does not do.
"""

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple, Type

import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensorMetadata, TensorProperties
from torch.distributed._shard.sharding_spec import ShardMetadata
from torchrec.distributed.embedding_types import (
    BaseEmbeddingSharder,
    KJTList,
    ShardedEmbeddingModule,
)
from torchrec.distributed.embeddingbag import (
    EmbeddingBagCollectionContext,
    EmbeddingBagCollectionSharder,
    ShardedEmbeddingBagCollection,
)
from torchrec.distributed.types import (
    Awaitable,
    LazyAwaitable,
    ParameterSharding,
    QuantizedCommCodecs,
    ShardingEnv,
    ShardingType,
)
from torchrec.optim.fused import FusedOptimizerModule
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from memcom_torchrec.distributed.entity_weight_gradient import EntityWeightGradient, pending_features
from memcom_torchrec.distributed.entity_weights import (
    EntityWeightTable,
    ShardedEntityWeights,
    fused_compute_kernels,
    with_entity_weight_columns,
    without_entity_weight_columns,
)
from memcom_torchrec.modules.memcom_configs import MEmComEmbeddingBagConfig
from memcom_torchrec.modules.memcom_embedding_modules import (
    FeatureSpec,
    MEmComEmbeddingBagCollection,
    StoredAssignments,
    apply_mean_pooling,
    hash_features,
    grid_cells,
)
from memcom_torchrec.modules.storage import table_storage
from memcom_torchrec.modules.validation import check_feature_specs, raise_on_any_rank

logger: logging.Logger = logging.getLogger(__name__)
TORCHREC_VALIDATOR_LOGGER = "torchrec.sparse.jagged_tensor_validator"

WEIGHTED_TBE = "weighted_tbe"
GATHERED = "gathered"
LOOKUP_PATHS: List[str] = ["auto", WEIGHTED_TBE, GATHERED]

SUPPORTED_SHARDING_TYPES: List[str] = [
    ShardingType.TABLE_WISE.value,
    ShardingType.ROW_WISE.value,
    ShardingType.TABLE_ROW_WISE.value,
]


@dataclass
class MEmComEmbeddingBagCollectionContext(EmbeddingBagCollectionContext):
    """Sharding context: TorchRec's EBC context plus the input's bag lengths (mean pooling)."""

    input_features: Optional[KeyedJaggedTensor] = None

    def record_stream(self, stream: torch.Stream) -> None:
        super().record_stream(stream)
        if self.input_features is not None:
            self.input_features.record_stream(stream)


def check_lookup_path(lookup_path: str) -> None:
    """Raises ``ValueError`` naming the choices if ``lookup_path`` is not one of ``LOOKUP_PATHS``."""
    if lookup_path not in LOOKUP_PATHS:
        raise ValueError(f"unknown MEmCom lookup_path '{lookup_path}'; use one of {LOOKUP_PATHS}")


def resolve_lookup_path(lookup_path: str, device: torch.device) -> str:
    """The gradient path of ``w`` for a device: ``"auto"`` is ``"gathered"`` on CPU, ``"weighted_tbe"`` elsewhere.

    Raises:
        ValueError: an unknown path.
    """
    check_lookup_path(lookup_path)
    if lookup_path == "auto":
        return GATHERED if device.type == "cpu" else WEIGHTED_TBE
    return lookup_path


def entity_weight_metadata(config: MEmComEmbeddingBagConfig, ps: ParameterSharding) -> ShardedTensorMetadata:
    """Global metadata of a table's ``(m, Q)`` ``w`` grid: the row blocks of ``U``'s plan, ``Q`` wide.

    Args:
        config (MEmComEmbeddingBagConfig): the table.
        ps (ParameterSharding): the plan of its ``U``.

    Returns:
        ShardedTensorMetadata: one shard per shard of ``U``, same rows and placement.
    """
    q = config.grid_columns
    return ShardedTensorMetadata(
        shards_metadata=[
            ShardMetadata(shard_offsets=[s.shard_offsets[0], 0], shard_sizes=[s.shard_sizes[0], q], placement=s.placement)
            for s in ps.sharding_spec.shards  # pyre-ignore[16]
        ],
        size=torch.Size([config.num_buckets, q]),
        tensor_properties=TensorProperties(dtype=torch.float32),
    )


class ShardedMEmComEmbeddingBagCollection(
    ShardedEmbeddingModule[KJTList, List[torch.Tensor], KeyedTensor, MEmComEmbeddingBagCollectionContext],
    FusedOptimizerModule,
):
    """Sharded twin of ``MEmComEmbeddingBagCollection`` (see the module docstring).

    Args:
        module (MEmComEmbeddingBagCollection): the unsharded module (its
            configs; weights are not copied, load a state_dict after sharding).
        table_name_to_parameter_sharding (Dict[str, ParameterSharding]): plan.
        ebc_sharder (EmbeddingBagCollectionSharder): shards the inner tables.
        env (ShardingEnv): process group.
        device (Optional[torch.device]): compute device.
        module_fqn (Optional[str]): this module's name in the model.
        validate_inputs (bool): check every batch (ids, keys, dtypes; one tiny
            all-reduce and one host read, so all ranks raise together). False
            skips all checks: validate in the data loader instead.
        lookup_path (str): how ``w`` gets its gradient: ``"weighted_tbe"``,
            ``"gathered"`` or ``"auto"`` (see the module docstring).
    """

    def __init__(
        self,
        module: MEmComEmbeddingBagCollection,
        table_name_to_parameter_sharding: Dict[str, ParameterSharding],
        ebc_sharder: EmbeddingBagCollectionSharder,
        env: ShardingEnv,
        device: Optional[torch.device] = None,
        module_fqn: Optional[str] = None,
        validate_inputs: bool = True,
        lookup_path: str = "auto",
    ) -> None:
        super().__init__(qcomm_codecs_registry=ebc_sharder.qcomm_codecs_registry)
        self._env = env
        self._pg = env.process_group
        self._rank: int = env.rank
        self._validate_inputs = validate_inputs
        self._is_weighted: bool = module.is_weighted()
        self._embedding_bag_configs = module.embedding_bag_configs()
        self._row_wise: bool = any(
            ps.sharding_type in (ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value)
            for t, ps in table_name_to_parameter_sharding.items()
            if t in {c.name for c in module.embedding_bag_configs()}
        )
        self._feature_specs: Dict[str, FeatureSpec] = module.feature_specs()
        self._memcom_configs: Dict[str, MEmComEmbeddingBagConfig] = {
            t.name: t for t in self._embedding_bag_configs if isinstance(t, MEmComEmbeddingBagConfig)
        }
        self._trained_tables = [n for n, t in self._memcom_configs.items() if t.train_entity_weights]

        dims = {t.name: t.embedding_dim for t in self._embedding_bag_configs}
        plan: Dict[str, ParameterSharding] = {}
        for table, ps in table_name_to_parameter_sharding.items():
            if table not in dims:
                continue
            shards = ps.sharding_spec.shards if ps.sharding_spec is not None else []  # pyre-ignore[16]
            empty = [sh.placement.rank() for sh in shards if sh.shard_sizes[0] == 0]
            if empty:
                rows = sum(sh.shard_sizes[0] for sh in shards)
                raise ValueError(
                    f"table '{table}': {ps.sharding_type} sharding splits its {rows} row(s) over {len(shards)} "
                    f"ranks and leaves rank(s) {empty} none; FBGEMM's CPU backward fails on an empty shard "
                    "(intermittently: 'more than 2B rows'). Use table-wise sharding for it, or a table with at "
                    "least one row per rank (a lower compression ratio)"
                )
            if table in self._memcom_configs and ps.sharding_type not in SUPPORTED_SHARDING_TYPES:
                raise ValueError(
                    f"MEmCom table '{table}': sharding type '{ps.sharding_type}' is not supported; "
                    f"use one of {SUPPORTED_SHARDING_TYPES} (w must live with its rows of U)"
                )
            plan[table] = without_entity_weight_columns(ps, dims[table])
        if self._is_weighted and self._trained_tables:
            raise ValueError(
                "sharding a MEmCom collection with is_weighted=True and trained per-entity weights "
                f"(tables {self._trained_tables}) is not supported: TorchRec's input all-to-all "
                "carries one weight per id, which the sharded module uses for i // m"
            )
        self._embedding_bag_collection: ShardedEmbeddingBagCollection = ebc_sharder.shard(
            module._embedding_bag_collection,
            plan,
            env,
            device,
            module_fqn=f"{module_fqn}._embedding_bag_collection" if module_fqn else None,
        )
        inner = self._embedding_bag_collection
        self._device = device or torch.device("cpu")
        self._lookup_path = resolve_lookup_path(lookup_path, self._device)
        # Features whose ids travel unhashed (their table is whole on one rank; the variants' never do).
        self._hashed_on_owner = {
            f
            for f, spec in self._feature_specs.items()
            if spec.is_memcom and not spec.is_variant
            and plan[spec.table].sharding_type == ShardingType.TABLE_WISE.value
        }
        self._assignments = StoredAssignments(self._embedding_bag_configs, self._device)
        # Whether some ids must be hashed before the all-to-all (row-wise tables route by row of U).
        self._hash_before_dist = any(
            spec.is_memcom and f not in self._hashed_on_owner for f, spec in self._feature_specs.items()
        )
        # The input all-to-all carries weights only when some id needs one.
        self._carries_weights = self._is_weighted or any(
            spec.is_memcom and spec.table in self._trained_tables and f not in self._hashed_on_owner
            for f, spec in self._feature_specs.items()
        )

        # This rank's slices of w, following the plan of U.
        fused_params = self._table_fused_params()
        self._entity_weight_shards = ShardedEntityWeights(
            {
                table: EntityWeightTable(
                    metadata=entity_weight_metadata(cfg, plan[table]),
                    grid_columns=cfg.grid_columns,
                    init=cfg.entity_weight_init,
                    fused_params=fused_params.get(table, {}),
                    label=f"MEmCom table '{table}'",
                )
                for table, cfg in self._memcom_configs.items()
                if cfg.train_entity_weights
            },
            env,
            self._device,
        )
        # Keys as the parameters' names: the inner optimizer's under "_embedding_bag_collection."
        self._optim = CombinedOptimizer(
            [("_embedding_bag_collection", inner.fused_optimizer), self._entity_weight_shards.optimizer]
        )

        # For every lookup (one per sharding type): the local features in order,
        # and the table of each.
        self._lookup_features: List[List[Tuple[str, str]]] = []
        # TorchRec multiplies the per-sample-weight gradient by the world size
        # (CommOpGradientScaling in the lookup) because feature processors are
        # averaged by DDP afterwards; w is not, so it divides that back out.
        self._lookup_grad_scales: List[float] = []
        # The gathered path: per lookup, its TBEs and (key, feature position) of each.
        self._entity_weight_gradient = EntityWeightGradient(self._entity_weight_shards)
        self._lookup_tbes: List[List[Tuple[nn.Module, List[Tuple[int, int]]]]] = []
        for lookup in inner._lookups:
            while isinstance(lookup, nn.parallel.DistributedDataParallel):
                lookup = lookup.module
            self._lookup_grad_scales.append(1.0 / float(getattr(lookup, "_scale_gradient_factor", 1)))
            feats = []
            for group in lookup.grouped_configs:
                for t in group.embedding_tables:
                    for f in t.feature_names:
                        feats.append((f, t.name))
            self._lookup_features.append(feats)
            self._lookup_tbes.append(self._attach_tbes(lookup))
        # state_dict: w as _entity_weights.<table>, like the unsharded module.
        self._entity_weight_shards.register_state_dict_hooks(self)

    # --------------------------------------------------------------- set-up
    def _attach_tbes(self, lookup: nn.Module) -> List[Tuple[nn.Module, List[Tuple[int, int]]]]:
        """Prepares a lookup's FBGEMM TBEs; returns each with its ``(key, feature position)`` pairs.

        The inner collection is weighted, so every feature reaches FBGEMM with
        per-sample weights, and FBGEMM computes their gradient (a kernel as
        costly as the lookup on CPU) unless told otherwise by
        ``feature_requires_grad``. Only trained ``w`` on the ``weighted_tbe``
        path needs it: plain tables and the hashing trick carry constant
        weights, and the ``gathered`` path computes ``w``'s gradient itself
        (its TBEs get the forward hook of ``EntityWeightGradient``).
        """
        trained = set(self._trained_tables) if self._lookup_path == WEIGHTED_TBE else set()
        tbes: List[Tuple[nn.Module, List[Tuple[int, int]]]] = []
        key = 0
        for emb in getattr(lookup, "_emb_modules", []):
            tbe, config = getattr(emb, "emb_module", None), getattr(emb, "config", None)
            if config is None:
                continue
            names = [t.name for t in config.embedding_tables for _ in t.feature_names]
            keys = list(range(key, key + len(names)))
            key += len(names)
            if tbe is None:
                continue
            flags = [name in trained for name in names]
            if not all(flags):
                requires_grad = torch.tensor(flags, dtype=torch.int32, device=self._device)

                def _pre_hook(module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], rg: torch.Tensor = requires_grad):
                    kwargs.setdefault("feature_requires_grad", rg)
                    return args, kwargs

                tbe.register_forward_pre_hook(_pre_hook, with_kwargs=True)
            if self._lookup_path == GATHERED and any(name in self._trained_tables for name in names):
                self._entity_weight_gradient.attach(tbe)
                tbes.append((tbe, list(zip(keys, range(len(names))))))
        return tbes

    def _table_fused_params(self) -> Dict[str, Dict[str, Any]]:
        out: Dict[str, Dict[str, Any]] = {}
        for infos in self._embedding_bag_collection.sharding_type_to_sharding_infos.values():
            for info in infos:
                out[info.embedding_config.name] = dict(info.fused_params or {})
        return out

    # ---------------------------------------------------------- sharded API
    def create_context(self) -> MEmComEmbeddingBagCollectionContext:
        return MEmComEmbeddingBagCollectionContext(sharding_contexts=[])

    def input_dist(
        self, ctx: MEmComEmbeddingBagCollectionContext, features: KeyedJaggedTensor
    ) -> Awaitable[Awaitable[KJTList]]:
        """Validates, hashes MEmCom ids and starts TorchRec's input all-to-all."""
        self._check_input(features)
        ctx.input_features = features
        trained = set(self._trained_tables)
        hashed_on_owner = self._hashed_on_owner
        if not self._carries_weights and not self._hash_before_dist:
            routed = features  # nothing to hash or weigh before the all-to-all: ids travel as given
        else:

            def carry(spec: FeatureSpec, rows: torch.Tensor, cols: torch.Tensor, weight: Optional[torch.Tensor]):
                return cols.float() if spec.table in trained else weight

            routed = hash_features(
                features,
                self._feature_specs,
                self._is_weighted,
                carry,
                skip=hashed_on_owner,
                weighted=self._carries_weights,
                assignments=self._assignments.tensors(),
            )
        inner = self._embedding_bag_collection
        if inner._has_uninitialized_input_dist and hashed_on_owner:
            # TorchRec checks the first batch's ids against the inner tables (m rows of U)
            # and warns about the unhashed ids; the check above covers them (n entities).
            with _logger_level(TORCHREC_VALIDATOR_LOGGER, logging.ERROR):
                return inner.input_dist(ctx, routed)
        return inner.input_dist(ctx, routed)

    def _check_input(self, features: KeyedJaggedTensor) -> None:
        """Validates the batch; all ranks agree on errors (and on batch sizes when row-wise)."""
        if not self._validate_inputs:
            return
        check = check_feature_specs(features, self._feature_specs, self._is_weighted)
        device = features.values().device if isinstance(features, KeyedJaggedTensor) else self._device
        batch = features.stride() if self._row_wise and check.error is None else None
        raise_on_any_rank(check, self._pg, device, batch)

    def _weighted_dist_input(self, dist_input: KJTList) -> KJTList:
        """The KJTs the TBEs consume: ids hashed (on the owner), ``w`` as per-sample weights."""
        out = []
        for lookup, (features, local_features, grad_scale) in enumerate(
            zip(dist_input, self._lookup_features, self._lookup_grad_scales)
        ):
            hashed = [f in self._hashed_on_owner for f, _ in local_features]
            reads_w = [t in self._entity_weight_shards.local for _, t in local_features]
            if not any(hashed) and not any(reads_w):
                out.append(features)  # no MEmCom work here (an unweighted KJT pools with weight 1)
                continue
            offsets = features.offset_per_key()
            values, carried = features.values(), features.weights_or_none()
            tables: List[Optional[str]] = [t if r else None for (_, t), r in zip(local_features, reads_w)]
            ids: List[torch.Tensor] = []
            weights: List[Optional[torch.Tensor]] = []
            indices: List[Optional[torch.Tensor]] = []
            for k, (feature, _) in enumerate(local_features):
                seg = slice(offsets[k], offsets[k + 1])
                rows, weight, index = values[seg], None if carried is None else carried[seg], None
                if hashed[k]:
                    rows, cols = grid_cells(rows, self._feature_specs[feature])
                    if reads_w[k]:
                        index = rows * self._feature_specs[feature].grid_columns + cols
                elif reads_w[k]:
                    # Row-wise: the row of this shard, and i // m carried as the weight.
                    index = rows.long() * self._feature_specs[feature].grid_columns + weight.long()
                ids.append(rows)
                weights.append(None if reads_w[k] else weight)
                indices.append(index)
            if self._lookup_path == GATHERED:
                looked_up = self._entity_weight_shards.gather(tables, indices)
                for tbe, pending in pending_features(self._lookup_tbes[lookup], tables, indices):
                    self._entity_weight_gradient.expect(tbe, pending)
            else:
                looked_up = self._entity_weight_shards.lookup_indices(tables, indices, grad_scale)
            per_sample = [w if w is not None else c for w, c in zip(looked_up, weights)]
            if any(w is not None for w in per_sample):
                per_sample = [
                    w if w is not None else torch.ones(r.shape, dtype=torch.float32, device=r.device)
                    for w, r in zip(per_sample, ids)
                ]
            out.append(
                KeyedJaggedTensor(
                    keys=features.keys(),
                    values=torch.cat(ids) if len(ids) > 1 else ids[0],
                    weights=_cat_or_none(per_sample),
                    lengths=features.lengths(),
                    offsets=features.offsets(),
                    stride=features.stride(),
                    length_per_key=features.length_per_key(),
                    offset_per_key=offsets,
                )
            )
        return KJTList(out)

    def compute(self, ctx: MEmComEmbeddingBagCollectionContext, dist_input: KJTList) -> List[torch.Tensor]:
        return self._embedding_bag_collection.compute(ctx, self._weighted_dist_input(dist_input))

    def output_dist(
        self, ctx: MEmComEmbeddingBagCollectionContext, output: List[torch.Tensor]
    ) -> LazyAwaitable[KeyedTensor]:
        return self._with_mean_pooling(ctx, self._embedding_bag_collection.output_dist(ctx, output))

    def compute_and_output_dist(
        self, ctx: MEmComEmbeddingBagCollectionContext, input: KJTList
    ) -> LazyAwaitable[KeyedTensor]:
        awaitable = self._embedding_bag_collection.compute_and_output_dist(
            ctx, self._weighted_dist_input(input)
        )
        return self._with_mean_pooling(ctx, awaitable)

    def _with_mean_pooling(
        self, ctx: MEmComEmbeddingBagCollectionContext, awaitable: LazyAwaitable[KeyedTensor]
    ) -> LazyAwaitable[KeyedTensor]:
        if not any(s.mean_pooling for s in self._feature_specs.values()):
            return awaitable
        features = ctx.input_features

        def _mean(kt: KeyedTensor) -> KeyedTensor:
            feature_order = [name.split("@")[0] for name in kt.keys()]
            values = apply_mean_pooling(
                kt.values(), features, self._feature_specs, feature_order, kt.length_per_key()
            )
            return KeyedTensor(keys=kt.keys(), length_per_key=kt.length_per_key(), values=values)

        awaitable.callbacks.append(_mean)
        return awaitable

    # ------------------------------------------------------------ the rest
    def set_assignment(self, table_name: str, cells: torch.Tensor) -> None:
        """Stores a table's entity -> cell map on this rank (the same on every rank; before training).

        Raises:
            ValueError: naming the table, if ``cells`` is not a valid assignment for it.
        """
        self._assignments.set(table_name, cells.to(self._device))

    def assignment(self, table_name: str) -> torch.Tensor:
        """The stored cells of a ``"frequency"`` / ``"clustered"`` table."""
        return self._assignments.get(table_name)

    @property
    def fused_optimizer(self) -> KeyedOptimizer:
        return self._optim

    def embedding_bag_configs(self) -> List[Any]:
        return self._embedding_bag_configs

    def sharded_parameter_names(self, prefix: str = "") -> Iterator[str]:
        yield from self._embedding_bag_collection.sharded_parameter_names(
            f"{prefix}._embedding_bag_collection" if prefix else "_embedding_bag_collection"
        )

    @property
    def unsharded_module_type(self) -> Type[MEmComEmbeddingBagCollection]:
        return MEmComEmbeddingBagCollection


@contextlib.contextmanager
def _logger_level(name: str, level: int) -> Iterator[None]:
    log = logging.getLogger(name)
    previous = log.level
    log.setLevel(level)
    try:
        yield
    finally:
        log.setLevel(previous)


def _cat_or_none(pieces: List[Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
    if not pieces or pieces[0] is None:
        return None
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]  # pyre-ignore[6]


class MEmComEmbeddingBagCollectionSharder(BaseEmbeddingSharder[MEmComEmbeddingBagCollection]):
    """Shards ``MEmComEmbeddingBagCollection`` for ``DistributedModelParallel``.

    Args:
        fused_params (Optional[Dict[str, Any]]): FBGEMM fused optimizer params
            (``optimizer``, ``learning_rate``, ...) for ``U`` and, mirrored, ``w``.
        qcomm_codecs_registry (Optional[Dict[str, QuantizedCommCodecs]]): comm codecs.
        validate_inputs (bool): check ids on every step on every rank (one
            host read per step); False when the data loader validates.
        lookup_path (str): ``"auto"`` (CPU: ``"gathered"``, CUDA:
            ``"weighted_tbe"``), ``"gathered"`` or ``"weighted_tbe"``: how
            ``w`` gets its gradient.

    Example::

        model = DistributedModelParallel(
            model, env=ShardingEnv.from_process_group(pg), device=device,
            sharders=[MEmComEmbeddingBagCollectionSharder(fused_params), *get_default_sharders()],
        )
    """

    def __init__(
        self,
        fused_params: Optional[Dict[str, Any]] = None,
        qcomm_codecs_registry: Optional[Dict[str, QuantizedCommCodecs]] = None,
        validate_inputs: bool = True,
        lookup_path: str = "auto",
    ) -> None:
        super().__init__(fused_params=fused_params, qcomm_codecs_registry=qcomm_codecs_registry)
        check_lookup_path(lookup_path)
        self._lookup_path = lookup_path
        self._ebc_sharder = EmbeddingBagCollectionSharder(
            fused_params=fused_params, qcomm_codecs_registry=qcomm_codecs_registry
        )
        self._validate_inputs = validate_inputs

    def shard(
        self,
        module: MEmComEmbeddingBagCollection,
        params: Dict[str, ParameterSharding],
        env: ShardingEnv,
        device: Optional[torch.device] = None,
        module_fqn: Optional[str] = None,
    ) -> ShardedMEmComEmbeddingBagCollection:
        return ShardedMEmComEmbeddingBagCollection(
            module, params, self._ebc_sharder, env, device, module_fqn, self._validate_inputs, self._lookup_path
        )

    def shardable_parameters(self, module: MEmComEmbeddingBagCollection) -> Dict[str, nn.Parameter]:
        """One parameter per table, as the planner should size it.

        For a MEmCom table this is a meta tensor of ``m x (d + Q)``: row ``h``
        of ``U`` plus the ``Q`` per-entity weights that live with it (``w``'s
        ``held_shape`` in ``table_storage``), so the
        planner's storage estimate (and its optimizer multiplier) covers ``w``.
        The extra columns are dropped again in ``shard``.
        """
        out: Dict[str, nn.Parameter] = {}
        bags = module._embedding_bag_collection.embedding_bags
        for config in module.embedding_bag_configs():
            param = bags[config.name].weight
            storage = table_storage(config)
            if storage.has("w"):  # the m x Q grid of w lives next to U's rows
                param = with_entity_weight_columns(param, storage.tensor("w").held_shape[1])
            out[config.name] = param
        return out

    def sharding_types(self, compute_device_type: str) -> List[str]:
        return list(SUPPORTED_SHARDING_TYPES)

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> List[str]:
        return fused_compute_kernels(compute_device_type)

    @property
    def module_type(self) -> Type[MEmComEmbeddingBagCollection]:
        return MEmComEmbeddingBagCollection
