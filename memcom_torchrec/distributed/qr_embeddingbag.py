"""Sharded quotient-remainder EmbeddingBagCollection and its sharder.

Design (in the style of TorchRec's sharded managed-collision collections and of
``memcom_embeddingbag.py``): the unsharded ``QREmbeddingBagCollection`` holds its
``Q``, ``R`` and plain tables in stock ``EmbeddingCollection`` children; the
sharded twin shards each child with TorchRec's stock
``EmbeddingCollectionSharder`` (same child names, so the same parameter FQNs)
and drives their input dist, lookup and output dist itself:

1. ``input_dist``: validate the input (all ranks agree, so a bad batch on one
   rank raises everywhere instead of hanging the others), derive ``i // p``
   (feature ``<f>__q``) and ``i % p`` (``<f>__r``), and start every child's
   input all-to-all. The children's requests are returned as one
   ``KJTListSplitsAwaitable``, so ``TrainPipelineSparseDist`` pipelines (and
   fuses) them like any TorchRec module's. For ``memcom_qr`` tables the ``<f>__q``
   ids carry ``i % p`` as their per-id weight through the same all-to-all
   (exact in float32 below 2**24).
2. ``compute``: the children's fused FBGEMM lookups. On the rank that owns
   row ``i // p`` of ``Q``, ``w[i]`` is looked up in the local slice of ``w``
   and multiplies that row, before the output all-to-all
   (``ShardedEntityWeights.scale_rows``): its backward computes the gradient
   ``<Q[i // p], grad>`` (``Q`` as looked up, before FBGEMM's fused update) and
   applies the table's optimizer to the touched ``w`` in place, in one pass of
   the fused op (``memcom_torchrec.optim.fused_step``).
3. ``output_dist``: the children's sequence all-to-alls; waiting on the result
   multiplies ``(w Q)`` and ``R`` rows per id and pools the bags
   (``pool_qr_sequences``, shared with the unsharded module).

Traffic per step: what TorchRec's sharded ``EmbeddingCollection`` moves for the
``Q`` and ``R`` features (one input and one sequence output all-to-all per
child), plus one float per id in a child that holds a ``memcom_qr`` table.

``w`` (``n`` scalars) is row-sharded with ``Q``: the rank owning rows
``[a, b)`` of ``Q`` owns entities ``[a*p, min(b*p, n))`` (table-wise: all of
them, on ``Q``'s rank). It appears in ``state_dict`` as a 1-D ``ShardedTensor``
named ``_entity_weights.<table>`` like the unsharded parameter, its optimizer
state sits in ``fused_optimizer`` (``EntityWeightFusedOptimizer``), and the
planner sizes it as ``p`` extra columns of ``Q`` (``shardable_parameters``).
Sharding types: table-wise and row-wise (``w`` must live with its rows of ``Q``).
"""

from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Type

import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensorMetadata, TensorProperties
from torch.distributed._shard.sharding_spec import ShardMetadata
from torchrec.distributed.embedding import (
    EmbeddingCollectionContext,
    EmbeddingCollectionSharder,
    ShardedEmbeddingCollection,
)
from torchrec.distributed.embedding_sharding import KJTListSplitsAwaitable
from torchrec.distributed.embedding_types import (
    BaseEmbeddingSharder,
    KJTList,
    ShardedEmbeddingModule,
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
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor
from torchrec.streamable import Multistreamable

from memcom_torchrec.distributed.entity_weights import (
    EntityWeightTable,
    ShardedEntityWeights,
    fused_compute_kernels,
    with_entity_weight_columns,
    without_entity_weight_columns,
)
from memcom_torchrec.modules.qr_configs import (
    ENTITY_WEIGHT_INIT,
    QUOTIENT_SUFFIX,
    QREmbeddingBagConfig,
    QRFeatureSpec,
)
from memcom_torchrec.modules.qr_embedding_modules import (
    QREmbeddingBagCollection,
    input_weight_scales,
    pool_qr_sequences,
    qr_lookup_features,
)
from memcom_torchrec.modules.storage import table_storage
from memcom_torchrec.modules.validation import InputCheck, check_feature_specs, raise_on_any_rank

SUPPORTED_SHARDING_TYPES: List[str] = [ShardingType.TABLE_WISE.value, ShardingType.ROW_WISE.value]
MAX_CARRIED_REMAINDER: int = 2**24  # i % p travels as a float32 per-id weight


@dataclass
class QREmbeddingBagCollectionContext(Multistreamable):
    """Sharding context: the children's contexts and the input (bag lengths, input weights).

    ``sharding_contexts`` lists every child's per-sharding-type contexts in
    order (the same objects): TorchRec's pipeline fills them in when it fuses
    the input all-to-alls of several modules.
    """

    sharding_contexts: List[Any] = field(default_factory=list)
    child_contexts: Dict[str, EmbeddingCollectionContext] = field(default_factory=dict)
    input_features: Optional[KeyedJaggedTensor] = None

    def record_stream(self, stream: torch.Stream) -> None:
        for ctx in self.child_contexts.values():
            ctx.record_stream(stream)
        if self.input_features is not None:
            self.input_features.record_stream(stream)


def entity_weight_metadata(config: QREmbeddingBagConfig, ps: ParameterSharding) -> ShardedTensorMetadata:
    """Global metadata of a table's ``w`` (``n`` scalars), row-sharded like its ``Q``.

    Args:
        config (QREmbeddingBagConfig): the table.
        ps (ParameterSharding): the plan of its ``Q``.

    Returns:
        ShardedTensorMetadata: for every non-empty shard of ``Q`` (rows
        ``[a, a + r)``), the shard of entities ``[a*p, min((a + r)*p, n))`` on the
        same rank.
    """
    p, n = config.num_collisions, config.num_embeddings
    shards = []
    for s in ps.sharding_spec.shards:  # pyre-ignore[16]
        start = min(s.shard_offsets[0] * p, n)
        end = min((s.shard_offsets[0] + s.shard_sizes[0]) * p, n)
        if end > start:
            shards.append(ShardMetadata(shard_offsets=[start], shard_sizes=[end - start], placement=s.placement))
    return ShardedTensorMetadata(
        shards_metadata=shards, size=torch.Size([n]), tensor_properties=TensorProperties(dtype=torch.float32)
    )


class _PooledAwaitable(LazyAwaitable[KeyedTensor]):
    """Waits for the children's sequence all-to-alls, then multiplies and pools."""

    def __init__(
        self,
        awaitables: List[LazyAwaitable[Dict[str, JaggedTensor]]],
        features: KeyedJaggedTensor,
        specs: Dict[str, QRFeatureSpec],
        is_weighted: bool,
    ) -> None:
        super().__init__()
        self._awaitables = awaitables
        self._features = features
        self._specs = specs
        self._is_weighted = is_weighted

    def _wait_impl(self) -> KeyedTensor:
        sequences: Dict[str, torch.Tensor] = {}
        for awaitable in self._awaitables:
            sequences.update({k: jt.values() for k, jt in awaitable.wait().items()})
        scales = input_weight_scales(self._features, self._specs, self._is_weighted)
        return pool_qr_sequences(self._features, self._specs, sequences, scales)


class ShardedQREmbeddingBagCollection(
    ShardedEmbeddingModule[KJTList, List[torch.Tensor], KeyedTensor, QREmbeddingBagCollectionContext],
    FusedOptimizerModule,
):
    """Sharded twin of ``QREmbeddingBagCollection`` (see the module docstring).

    Args:
        module (QREmbeddingBagCollection): the unsharded module (its configs;
            weights are not copied, load a state_dict after sharding).
        table_name_to_parameter_sharding (Dict[str, ParameterSharding]): plan of
            the inner tables (``<table>__q``, ``<table>__r``, plain tables).
        ec_sharder (EmbeddingCollectionSharder): shards the inner collections.
        env (ShardingEnv): process group.
        device (Optional[torch.device]): compute device.
        module_fqn (Optional[str]): this module's name in the model.
        validate_inputs (bool): check every batch (ids, keys, dtypes; one tiny
            all-reduce so all ranks raise together). False skips all checks.
    """

    def __init__(
        self,
        module: QREmbeddingBagCollection,
        table_name_to_parameter_sharding: Dict[str, ParameterSharding],
        ec_sharder: EmbeddingCollectionSharder,
        env: ShardingEnv,
        device: Optional[torch.device] = None,
        module_fqn: Optional[str] = None,
        validate_inputs: bool = True,
    ) -> None:
        super().__init__(qcomm_codecs_registry=ec_sharder.qcomm_codecs_registry)
        self._env = env
        self._pg = env.process_group
        self._rank: int = env.rank
        self._module_fqn = module_fqn
        self._validate_inputs = validate_inputs
        self._is_weighted: bool = module.is_weighted()
        self._embedding_bag_configs: List[Any] = module.embedding_bag_configs()
        self._feature_specs: Dict[str, QRFeatureSpec] = module.feature_specs()
        self._group_inner_features: Dict[str, List[str]] = module.group_inner_features()
        self._group_names: List[str] = list(self._group_inner_features)
        self._weighted_configs: Dict[str, QREmbeddingBagConfig] = {
            t.name: t for t in self._embedding_bag_configs if isinstance(t, QREmbeddingBagConfig) and t.entity_weights
        }
        # <feature>__q -> its table, for the features whose ids carry i % p.
        self._quotient_feature_table: Dict[str, str] = {
            f + QUOTIENT_SUFFIX: s.table for f, s in self._feature_specs.items() if s.has_entity_weights
        }
        self._carried_features: List[str] = [f for f, s in self._feature_specs.items() if s.has_entity_weights]

        plan: Dict[str, ParameterSharding] = {}
        for table, ps in table_name_to_parameter_sharding.items():
            owner = table[: -len(QUOTIENT_SUFFIX)] if table.endswith(QUOTIENT_SUFFIX) else None
            if owner in self._weighted_configs:
                config = self._weighted_configs[owner]
                if ps.sharding_type not in SUPPORTED_SHARDING_TYPES:
                    raise ValueError(
                        f"QR table '{owner}' with entity_weights: sharding type '{ps.sharding_type}' of '{table}' "
                        f"is not supported; use one of {SUPPORTED_SHARDING_TYPES} (w must live with its rows of Q)"
                    )
                if config.num_collisions > MAX_CARRIED_REMAINDER:
                    raise ValueError(
                        f"QR table '{owner}': num_collisions={config.num_collisions} is too large to carry i % p "
                        f"as a float32 weight (at most {MAX_CARRIED_REMAINDER})"
                    )
                ps = without_entity_weight_columns(ps, config.embedding_dim)
            plan[table] = ps

        # The stock sharder shards every inner EmbeddingCollection under its own name.
        for name in self._group_names:
            child = getattr(module, name)
            child_plan = {c.name: plan[c.name] for c in child.embedding_configs()}
            sharded = ec_sharder.shard(
                child, child_plan, env, device, module_fqn=f"{module_fqn}.{name}" if module_fqn else name
            )
            self.add_module(name, sharded)
        self._device: torch.device = device or torch.device("cpu")

        # This rank's slices of w, following the plan of Q.
        fused_params = self._table_fused_params()
        self._entity_weight_shards = ShardedEntityWeights(
            {
                table: EntityWeightTable(
                    metadata=entity_weight_metadata(config, plan[table + QUOTIENT_SUFFIX]),
                    grid_columns=config.num_collisions,
                    init=ENTITY_WEIGHT_INIT,
                    fused_params=fused_params.get(table + QUOTIENT_SUFFIX, {}),
                    label=f"QR table '{table}'",
                    rows_of="Q",
                )
                for table, config in self._weighted_configs.items()
            },
            env,
            self._device,
        )
        # Keys as the parameters' names: each child's under its own name.
        self._optim = CombinedOptimizer(
            [(name, getattr(self, name).fused_optimizer) for name in self._group_names]
            + [self._entity_weight_shards.optimizer]
        )
        # state_dict: w as _entity_weights.<table>, like the unsharded module.
        self._entity_weight_shards.register_state_dict_hooks(self)

    # --------------------------------------------------------------- set-up
    def _children(self) -> Iterator[ShardedEmbeddingCollection]:
        for name in self._group_names:
            yield getattr(self, name)

    def _table_fused_params(self) -> Dict[str, Dict[str, Any]]:
        """The fused params FBGEMM got for every local inner table."""
        out: Dict[str, Dict[str, Any]] = {}
        for child in self._children():
            for lookup in child._lookups:
                while isinstance(lookup, nn.parallel.DistributedDataParallel):
                    lookup = lookup.module
                for group in getattr(lookup, "grouped_configs", []):
                    for t in group.embedding_tables:
                        out[t.name] = dict(group.fused_params or {})
        return out

    # ---------------------------------------------------------- sharded API
    def create_context(self) -> QREmbeddingBagCollectionContext:
        return QREmbeddingBagCollectionContext(
            child_contexts={name: getattr(self, name).create_context() for name in self._group_names}
        )

    def input_dist(
        self, ctx: QREmbeddingBagCollectionContext, features: KeyedJaggedTensor
    ) -> Awaitable[Awaitable[KJTList]]:
        """Validates, derives ``i // p`` and ``i % p`` and starts every child's input all-to-all."""
        self._check_input(features)
        ctx.input_features = features
        inner = qr_lookup_features(features, self._feature_specs, self._group_inner_features, self._carried_features)
        awaitables: List[Any] = []
        sharding_types: List[str] = []
        for name in self._group_names:
            child: ShardedEmbeddingCollection = getattr(self, name)
            child_ctx = ctx.child_contexts[name]
            splits = child.input_dist(child_ctx, inner[name])
            awaitables.extend(splits.awaitables)  # pyre-ignore[16]
            ctx.sharding_contexts.extend(child_ctx.sharding_contexts)
            sharding_types.extend(child._sharding_type_to_sharding)
        return KJTListSplitsAwaitable(awaitables, ctx, self._module_fqn, sharding_types)

    def _check_input(self, features: KeyedJaggedTensor) -> None:
        """Validates the batch; all ranks agree on errors."""
        if not self._validate_inputs:
            return
        check = check_feature_specs(features, self._feature_specs, self._is_weighted)
        if check.error is None and features.stride() == 0:
            # TorchRec's sharded EmbeddingCollection cannot split an empty batch.
            check = InputCheck("empty batch on a sharded QR collection: pad it (memcom_torchrec.data.pad_batch)")
        device = features.values().device if isinstance(features, KeyedJaggedTensor) else self._device
        raise_on_any_rank(check, self._pg, device)

    def _split_per_child(self, items: List[Any]) -> Dict[str, List[Any]]:
        """The children's parts of a flat per-sharding-type list (their order, their lengths)."""
        out: Dict[str, List[Any]] = {}
        start = 0
        for name in self._group_names:
            count = len(getattr(self, name)._lookups)
            out[name] = [items[i] for i in range(start, start + count)]
            start += count
        return out

    def _scale_by_entity_weights(self, features: KeyedJaggedTensor, embeddings: torch.Tensor) -> torch.Tensor:
        """Multiplies the looked-up rows of ``Q`` by ``w`` (``w``'s fused step in backward)."""
        tables = [self._quotient_feature_table.get(k) for k in features.keys()]
        if not any(t in self._entity_weight_shards.local for t in tables):
            return embeddings
        # values: rows of Q local to this shard (w's slice starts at its first row), carried: i % p.
        return self._entity_weight_shards.scale_rows(
            tables, features.values(), features.weights(), features.offset_per_key(), embeddings
        )

    def compute(self, ctx: QREmbeddingBagCollectionContext, dist_input: KJTList) -> List[torch.Tensor]:
        out: List[torch.Tensor] = []
        for name, part in self._split_per_child(list(dist_input)).items():
            embeddings = getattr(self, name).compute(ctx.child_contexts[name], KJTList(part))
            out.extend(self._scale_by_entity_weights(f, e) for f, e in zip(part, embeddings))
        return out

    def output_dist(
        self, ctx: QREmbeddingBagCollectionContext, output: List[torch.Tensor]
    ) -> LazyAwaitable[KeyedTensor]:
        awaitables = [
            getattr(self, name).output_dist(ctx.child_contexts[name], part)
            for name, part in self._split_per_child(output).items()
        ]
        assert ctx.input_features is not None
        return _PooledAwaitable(awaitables, ctx.input_features, self._feature_specs, self._is_weighted)

    def compute_and_output_dist(
        self, ctx: QREmbeddingBagCollectionContext, input: KJTList
    ) -> LazyAwaitable[KeyedTensor]:
        return self.output_dist(ctx, self.compute(ctx, input))

    # ------------------------------------------------------------ the rest
    @property
    def fused_optimizer(self) -> KeyedOptimizer:
        return self._optim

    def embedding_bag_configs(self) -> List[Any]:
        return self._embedding_bag_configs

    def is_weighted(self) -> bool:
        return self._is_weighted

    def feature_specs(self) -> Dict[str, QRFeatureSpec]:
        return self._feature_specs

    def sharded_parameter_names(self, prefix: str = "") -> Iterator[str]:
        for name in self._group_names:
            yield from getattr(self, name).sharded_parameter_names(f"{prefix}.{name}" if prefix else name)

    @property
    def unsharded_module_type(self) -> Type[QREmbeddingBagCollection]:
        return QREmbeddingBagCollection


class QREmbeddingBagCollectionSharder(BaseEmbeddingSharder[QREmbeddingBagCollection]):
    """Shards ``QREmbeddingBagCollection`` for ``DistributedModelParallel``.

    Args:
        fused_params (Optional[Dict[str, Any]]): FBGEMM fused optimizer params
            (``optimizer``, ``learning_rate``, ...) for ``Q``, ``R`` and, mirrored, ``w``.
        qcomm_codecs_registry (Optional[Dict[str, QuantizedCommCodecs]]): comm codecs.
        validate_inputs (Optional[bool]): check ids on every step on every rank
            (``None``: as the unsharded module's ``validate_inputs``).

    Example::

        model = DistributedModelParallel(
            model, env=ShardingEnv.from_process_group(pg), device=device,
            sharders=[QREmbeddingBagCollectionSharder(fused_params), *get_default_sharders()],
        )
    """

    def __init__(
        self,
        fused_params: Optional[Dict[str, Any]] = None,
        qcomm_codecs_registry: Optional[Dict[str, QuantizedCommCodecs]] = None,
        validate_inputs: Optional[bool] = None,
    ) -> None:
        super().__init__(fused_params=fused_params, qcomm_codecs_registry=qcomm_codecs_registry)
        self._ec_sharder = EmbeddingCollectionSharder(fused_params=fused_params, qcomm_codecs_registry=qcomm_codecs_registry)
        self._validate_inputs = validate_inputs

    def shard(
        self,
        module: QREmbeddingBagCollection,
        params: Dict[str, ParameterSharding],
        env: ShardingEnv,
        device: Optional[torch.device] = None,
        module_fqn: Optional[str] = None,
    ) -> ShardedQREmbeddingBagCollection:
        validate = module._validate_inputs if self._validate_inputs is None else self._validate_inputs
        return ShardedQREmbeddingBagCollection(module, params, self._ec_sharder, env, device, module_fqn, validate)

    def shardable_parameters(self, module: QREmbeddingBagCollection) -> Dict[str, nn.Parameter]:
        """One parameter per inner table, as the planner should size it.

        For the ``Q`` of a table with ``entity_weights`` this is a meta tensor of
        ``ceil(n/p) x (d + p)``: row ``r`` of ``Q`` plus the ``p`` per-entity
        weights that live with it, so the planner's storage estimate (and its
        optimizer multiplier) covers ``w``. The extra columns are dropped again
        in ``shard``.
        """
        weighted = {  # Q's name -> columns of w's grid (its held_shape in table_storage)
            t.name + QUOTIENT_SUFFIX: table_storage(t).tensor("w").held_shape[1]
            for t in module.embedding_bag_configs()
            if table_storage(t).has("w")
        }
        out: Dict[str, nn.Parameter] = {}
        for name in module.group_inner_features():
            for pname, param in getattr(module, name).embeddings.named_parameters():
                table = pname.split(".")[0]
                if table in weighted:
                    param = with_entity_weight_columns(param, weighted[table])
                out[table] = param
        return out

    def sharding_types(self, compute_device_type: str) -> List[str]:
        return list(SUPPORTED_SHARDING_TYPES)

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> List[str]:
        return fused_compute_kernels(compute_device_type)

    @property
    def module_type(self) -> Type[QREmbeddingBagCollection]:
        return QREmbeddingBagCollection
