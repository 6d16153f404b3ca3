"""Per-entity weights ``w`` of a sharded collection, as one rank holds them.

Both sharded collections that train ``w`` keep it with the rows of another
table: MEmCom's ``(m, Q)`` grid is row-sharded with ``U`` (row ``h`` of ``w``
holds the ``Q`` entities hashed to row ``h`` of ``U``), memcom_qr's ``n``
scalars with ``Q`` (row ``r`` of ``Q`` owns entities ``[r*p, (r+1)*p)``).
Each module derives the global layout of ``w`` from the plan of that table
(``ShardedTensorMetadata``) and brings the ids to the lookup; the rest is
shared and lives here:

- ``ShardedEntityWeights``: this rank's slice of every table's ``w`` and its
  optimizer states, looked up per id with the update in backward (``step``
  and ``scale_rows``: the fused op of ``optim.fused_step``; ``lookup``:
  ``entity_weight_lookup``, for FBGEMM's own ``w`` gradient), exposed as ``ShardedTensor``s in the
  ``fused_optimizer`` (``EntityWeightFusedOptimizer``) and in ``state_dict``
  as ``_entity_weights.<table>``, like the unsharded parameter. Every rank has
  every key (an empty view where the table lives on other ranks only);
  ``load_state_dict`` takes a full tensor or this rank's own shard.
- The planner's view: ``w`` as extra columns of its table
  (``with_entity_weight_columns``), dropped again before the table is sharded
  (``without_entity_weight_columns``), on FBGEMM's fused kernels only
  (``fused_compute_kernels``).
"""

import copy
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardedTensorMetadata
from torch.distributed._shard.sharding_spec import EnumerableShardingSpec, ShardMetadata
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.types import ParameterSharding, ShardingEnv

from memcom_torchrec.modules.qr_configs import ENTITY_WEIGHTS
from memcom_torchrec.optim.entity_weight_optimizer import EntityWeightOptimizerConfig, entity_weight_lookup
from memcom_torchrec.optim.fused import EntityWeightFusedOptimizer
from memcom_torchrec.optim.fused_step import FeatureGradient, entity_weight_step_


@dataclass
class EntityWeightTable:
    """One table's ``w`` as its sharded collection plans it.

    Args:
        metadata (ShardedTensorMetadata): the global ``w`` and its shards, one
            per rank that holds rows of the table ``w`` lives with.
        grid_columns (int): entities of ``w`` per row of that table
            (MEmCom: ``Q``; memcom_qr: ``p``).
        init (float): initial value of every entity weight.
        fused_params (Dict[str, Any]): FBGEMM's fused params of that table;
            the optimizer of ``w`` mirrors them.
        label (str): how errors name the table (``"MEmCom table 'item'"``).
        rows_of (str): how errors name the table ``w`` lives with ("": unnamed).
    """

    metadata: ShardedTensorMetadata
    grid_columns: int
    init: float
    fused_params: Dict[str, Any]
    label: str
    rows_of: str = ""


@dataclass
class LocalEntityWeights:
    """This rank's slice of one table's ``w`` and its optimizer states (an ``EntityWeightSlice``)."""

    table: str
    shard: ShardMetadata  # where the slice sits in the global w
    grid_columns: int
    weights: torch.Tensor  # shard.shard_sizes
    states: Dict[str, torch.Tensor]  # the same shape each; Adam: plus a 0-d "step"
    config: EntityWeightOptimizerConfig
    sharded: ShardedTensor = field(repr=False)
    sharded_states: Dict[str, ShardedTensor] = field(repr=False)

    def describe(self) -> str:
        """The slice in errors: ``entities [a, b)`` of a flat ``w``, ``rows [a, b) x Q`` of a grid."""
        start, size = self.shard.shard_offsets[0], self.shard.shard_sizes[0]
        if self.weights.dim() == 1:
            return f"entities [{start}, {start + size})"
        return f"rows [{start}, {start + size}) x {self.shard.shard_sizes[1]}"


class ShardedEntityWeights:
    """Every table's ``w`` of one sharded collection, as this rank holds it.

    Args:
        tables (Dict[str, EntityWeightTable]): table name -> its planned ``w``.
        env (ShardingEnv): process group and rank.
        device (torch.device): where the local slices live.

    Example::

        self._entity_weight_shards = ShardedEntityWeights(tables, env, device)
        self._optim = CombinedOptimizer([..., self._entity_weight_shards.optimizer])
        self._entity_weight_shards.register_state_dict_hooks(self)
    """

    def __init__(self, tables: Dict[str, EntityWeightTable], env: ShardingEnv, device: torch.device) -> None:
        self._tables = tables
        self._pg = env.process_group
        # Makes autograd call the lookups' backward (w itself has no grad).
        self._anchor = torch.empty(0, device=device, requires_grad=True)
        self.local: Dict[str, LocalEntityWeights] = {}
        for table, spec in tables.items():
            mine = [s for s in spec.metadata.shards_metadata if s.placement.rank() == env.rank]  # pyre-ignore[16]
            if len(mine) > 1:
                of = f" of {spec.rows_of}" if spec.rows_of else ""
                raise ValueError(f"{spec.label}: more than one shard{of} on rank {env.rank}")
            if mine:
                self.local[table] = self._allocate(table, spec, mine[0], device)
        self._remote_views: Dict[str, ShardedTensor] = {}
        self.optimizer = EntityWeightFusedOptimizer({f"{ENTITY_WEIGHTS}.{t}": lw for t, lw in self.local.items()})

    def _allocate(
        self, table: str, spec: EntityWeightTable, meta: ShardMetadata, device: torch.device
    ) -> LocalEntityWeights:
        size = tuple(meta.shard_sizes)
        config = EntityWeightOptimizerConfig.from_fused_params(spec.fused_params)
        weights = torch.full(size, spec.init, device=device)
        states = {name: torch.zeros(size, device=device) for name in config.state_names()}

        def _sharded(t: torch.Tensor) -> ShardedTensor:
            return ShardedTensor._init_from_local_shards_and_global_metadata(
                [Shard(tensor=t, metadata=copy.deepcopy(meta))], copy.deepcopy(spec.metadata), process_group=self._pg
            )

        sharded_states = {name: _sharded(t) for name, t in states.items()}
        if "exp_avg" in config.state_names():
            states["step"] = torch.zeros((), device=device)
        return LocalEntityWeights(
            table=table,
            shard=meta,
            grid_columns=spec.grid_columns,
            weights=weights,
            states=states,
            config=config,
            sharded=_sharded(weights),
            sharded_states=sharded_states,
        )

    # ---------------------------------------------------------------- lookup
    def lookup(
        self,
        tables: List[Optional[str]],
        rows: torch.Tensor,
        carried: torch.Tensor,
        offsets: List[int],
        grad_scale: float = 1.0,
    ) -> List[Optional[torch.Tensor]]:
        """``w`` of every id of a KJT's keys whose table has a slice here; the backward updates it.

        One lookup per table, so duplicate ids across the table's features are
        coalesced into one optimizer update (FBGEMM's EXACT_* semantics).

        Args:
            tables (List[Optional[str]]): per key, the table whose ``w`` it
                reads (None: none).
            rows (torch.Tensor): the ids, as rows of this rank's shard of the
                table ``w`` lives with.
            carried (torch.Tensor): per id, its entity within that row
                (MEmCom: ``i // m``; memcom_qr: ``i % p``).
            offsets (List[int]): the KJT's ``offset_per_key()``.
            grad_scale (float): factor on the incoming gradient
                (``entity_weight_lookup``).

        Returns:
            List[Optional[torch.Tensor]]: per key, its ids' ``w`` (None: the
            key reads no ``w`` on this rank).
        """
        indices: List[Optional[torch.Tensor]] = [None] * len(tables)
        for k, table in enumerate(tables):
            local = self.local.get(table) if table is not None else None
            if local is not None:
                seg = slice(offsets[k], offsets[k + 1])
                indices[k] = rows[seg].long() * local.grid_columns + carried[seg].long()
        return self.lookup_indices(tables, indices, grad_scale)

    def lookup_indices(
        self, tables: List[Optional[str]], indices: List[Optional[torch.Tensor]], grad_scale: float = 1.0
    ) -> List[Optional[torch.Tensor]]:
        """``lookup`` given each key's positions in the flat local ``w`` (``row * grid_columns + entity``).

        Args:
            tables (List[Optional[str]]): per key, the table whose ``w`` it reads.
            indices (List[Optional[torch.Tensor]]): per key, positions in that
                table's local slice (None: the key reads no ``w``).
            grad_scale (float): factor on the incoming gradient.

        Returns:
            List[Optional[torch.Tensor]]: per key, its ids' ``w``, differentiable.
        """
        pieces: List[Optional[torch.Tensor]] = [None] * len(tables)
        for table, ks, index in self._per_table(tables, indices):
            local = self.local[table]
            looked_up = entity_weight_lookup(
                local.weights.view(-1),
                index,
                self._flat_states(local),
                self.optimizer.group_of(table),
                local.config.optimizer,
                self._anchor,
                grad_scale,
            )
            for k, piece in zip(ks, looked_up.split([indices[k].numel() for k in ks])):
                pieces[k] = piece
        return pieces

    def scale_rows(
        self,
        tables: List[Optional[str]],
        rows: torch.Tensor,
        carried: torch.Tensor,
        offsets: List[int],
        embeddings: torch.Tensor,
    ) -> torch.Tensor:
        """Each looked-up row times its id's ``w`` (1 for keys without one); the backward steps ``w``.

        The gradient of ``w[i_j]`` is ``<row_j, grad_j>``, one bag of one id per row: the backward
        hands every table's rows and their gradients to ``entity_weight_step_`` (the fused op),
        with the rows as looked up (``Q`` before FBGEMM's fused update), and passes
        ``w[i_j] * grad_j`` on to the rows.

        Args:
            tables (List[Optional[str]]): per key of the KJT, its table (None: no ``w``).
            rows (torch.Tensor): the ids, as rows of this rank's shard.
            carried (torch.Tensor): per id, its entity within that row.
            offsets (List[int]): the KJT's ``offset_per_key()``.
            embeddings (torch.Tensor): ``ids x d`` looked-up rows, in KJT order.

        Returns:
            torch.Tensor: the scaled rows, differentiable with respect to ``embeddings``.
        """
        scale = torch.ones(rows.shape, dtype=torch.float32, device=rows.device)
        steps: List[Tuple[str, torch.Tensor, torch.Tensor]] = []  # (table, positions in w, rows of embeddings)
        keys_of: Dict[str, List[int]] = {}
        for k, table in enumerate(tables):
            if table is not None and table in self.local:
                keys_of.setdefault(table, []).append(k)
        for table, ks in keys_of.items():
            local = self.local[table]
            segments = [torch.arange(offsets[k], offsets[k + 1], device=rows.device) for k in ks]
            at = segments[0] if len(segments) == 1 else torch.cat(segments)
            positions = rows.index_select(0, at).long() * local.grid_columns + carried.index_select(0, at).long()
            scale.index_copy_(0, at, local.weights.view(-1).index_select(0, positions))
            steps.append((table, positions, at))
        if not steps:
            return embeddings
        return _ScaledRows.apply(embeddings, scale.to(embeddings.dtype), self, steps)

    def gather(self, tables: List[Optional[str]], indices: List[Optional[torch.Tensor]]) -> List[Optional[torch.Tensor]]:
        """``w`` at each key's positions, as plain values (no autograd).

        The caller computes the gradient of these values itself and applies it
        with ``step`` (``entity_weight_gradient``).

        Args:
            tables (List[Optional[str]]): per key, the table whose ``w`` it reads.
            indices (List[Optional[torch.Tensor]]): per key, positions in the
                table's local slice (None: the key reads no ``w``).

        Returns:
            List[Optional[torch.Tensor]]: per key, its ids' ``w``.
        """
        pieces: List[Optional[torch.Tensor]] = [None] * len(tables)
        for table, ks, index in self._per_table(tables, indices):
            values = self.local[table].weights.view(-1).index_select(0, index)
            for k, piece in zip(ks, values.split([indices[k].numel() for k in ks])):
                pieces[k] = piece
        return pieces

    def step(self, table: str, U: torch.Tensor, features: List[FeatureGradient]) -> None:
        """``w``'s gradient from its features' pooled gradients and its optimizer step, in one pass.

        Args:
            table (str): a table with a slice on this rank.
            U (torch.Tensor): the rows its ids read, before this step's update.
            features (List[FeatureGradient]): the features that read this ``w``.
        """
        local = self.local[table]
        entity_weight_step_(local.weights.view(-1), self._flat_states(local), U, features,
                            self.optimizer.group_of(table), local.config.optimizer)

    def _per_table(
        self, tables: List[Optional[str]], indices: List[Optional[torch.Tensor]]
    ) -> List[Tuple[str, List[int], torch.Tensor]]:
        """``(table, its keys, their positions concatenated)`` for each table with a slice here."""
        out = []
        for table in self.local:
            ks = [k for k, t in enumerate(tables) if t == table and indices[k] is not None]
            if ks:
                out.append((table, ks, indices[ks[0]] if len(ks) == 1 else torch.cat([indices[k] for k in ks])))
        return out

    @staticmethod
    def _flat_states(local: LocalEntityWeights) -> Dict[str, torch.Tensor]:
        return {n: s.view(-1) if n != "step" else s for n, s in local.states.items()}

    # ------------------------------------------------------------ state dict
    def register_state_dict_hooks(self, module: nn.Module) -> None:
        """Makes ``module.state_dict()`` carry ``_entity_weights.<table>`` and ``load_state_dict`` restore it."""
        module._register_state_dict_hook(self._post_state_dict_hook)
        module._register_load_state_dict_pre_hook(self._pre_load_state_dict_hook, with_module=False)

    def _post_state_dict_hook(
        self, module: nn.Module, destination: Dict[str, Any], prefix: str, _local_metadata: Any
    ) -> None:
        for table, local in self.local.items():
            destination[f"{prefix}{ENTITY_WEIGHTS}.{table}"] = local.sharded
        for table in self._tables:
            if table not in self.local:
                # A table on other ranks only: an empty ShardedTensor view of
                # the same global tensor keeps the keys identical on all ranks.
                destination[f"{prefix}{ENTITY_WEIGHTS}.{table}"] = self._remote_view(table)

    def _remote_view(self, table: str) -> ShardedTensor:
        """A view of a table's ``w`` with no local shard (it lives on other ranks)."""
        if table not in self._remote_views:
            self._remote_views[table] = ShardedTensor._init_from_local_shards_and_global_metadata(
                [], copy.deepcopy(self._tables[table].metadata), process_group=self._pg
            )
        return self._remote_views[table]

    def _pre_load_state_dict_hook(
        self,
        state_dict: Dict[str, Any],
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: List[str],
        unexpected_keys: List[str],
        error_msgs: List[str],
    ) -> None:
        for table, spec in self._tables.items():
            key = f"{prefix}{ENTITY_WEIGHTS}.{table}"
            if key not in state_dict:
                if strict:
                    missing_keys.append(key)
                continue
            value = state_dict.pop(key)
            local = self.local.get(table)
            if local is None:
                continue
            start, size = local.shard.shard_offsets[0], tuple(local.shard.shard_sizes)
            if isinstance(value, ShardedTensor):
                shards = value.local_shards()
                if (
                    len(shards) != 1
                    or list(shards[0].metadata.shard_offsets) != list(local.shard.shard_offsets)
                    or tuple(shards[0].tensor.shape) != size
                ):
                    error_msgs.append(
                        f"{key}: sharded tensor does not match this rank's shard ({local.describe()}); "
                        "load through torch.distributed.checkpoint to re-shard"
                    )
                    continue
                src = shards[0].tensor
            else:
                full = torch.as_tensor(value)
                expected = tuple(spec.metadata.size)
                if tuple(full.shape) != expected:
                    error_msgs.append(f"{key}: expected shape {expected}, got {tuple(full.shape)}")
                    continue
                src = full[start : start + size[0]]
            if src.data_ptr() != local.weights.data_ptr():
                with torch.no_grad():
                    local.weights.copy_(src)


# ------------------------------------------------------------------ planner
def with_entity_weight_columns(param: nn.Parameter, columns: int) -> nn.Parameter:
    """A meta parameter ``columns`` wider than ``param``: its table plus the ``w`` that lives with each row.

    The planner sizes this (storage and optimizer multiplier cover ``w``);
    ``param``'s optimizer attributes are carried over.
    """
    rows, dim = param.shape
    sized = nn.Parameter(torch.empty(rows, dim + columns, device="meta"), requires_grad=param.requires_grad)
    for attr in ("_optimizer_classes", "_optimizer_kwargs", "_in_backward_optimizers"):
        if hasattr(param, attr):
            setattr(sized, attr, getattr(param, attr))
    return sized


def without_entity_weight_columns(ps: ParameterSharding, dim: int) -> ParameterSharding:
    """A copy of a table's ParameterSharding whose shards are ``dim`` columns wide (drops the ``w`` columns)."""
    ps = copy.deepcopy(ps)
    spec = ps.sharding_spec
    if isinstance(spec, EnumerableShardingSpec):
        for shard in spec.shards:
            shard.shard_sizes = [shard.shard_sizes[0], dim]
            shard.shard_offsets = [shard.shard_offsets[0], 0]
    return ps


def fused_compute_kernels(compute_device_type: str) -> List[str]:
    """FBGEMM's fused kernels (UVM ones too on CUDA): ``w``'s optimizer mirrors their fused params."""
    kernels = [EmbeddingComputeKernel.FUSED.value]
    if compute_device_type == "cuda":
        kernels += [EmbeddingComputeKernel.FUSED_UVM.value, EmbeddingComputeKernel.FUSED_UVM_CACHING.value]
    return kernels


class _ScaledRows(torch.autograd.Function):
    """``embeddings * scale``, whose backward takes ``w``'s optimizer step (``ShardedEntityWeights.scale_rows``)."""

    @staticmethod
    def forward(  # pyre-ignore[14]
        ctx: Any,
        embeddings: torch.Tensor,
        scale: torch.Tensor,
        owner: ShardedEntityWeights,
        steps: List[Tuple[str, torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        ctx.owner, ctx.steps = owner, steps
        ctx.save_for_backward(embeddings, scale)
        return embeddings * scale.unsqueeze(1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:  # pyre-ignore[14]
        embeddings, scale = ctx.saved_tensors
        with torch.no_grad():
            grad = grad.contiguous()
            for table, positions, at in ctx.steps:
                if at.numel() == grad.shape[0]:  # every row reads this table's w: no gather
                    U, g = embeddings, grad
                else:
                    U, g = embeddings.index_select(0, at), grad.index_select(0, at)
                k = positions.numel()
                feature = FeatureGradient(
                    grad=g, rows=torch.arange(k, device=g.device), positions=positions,
                    bag_offsets=torch.arange(k + 1, device=g.device),
                )
                ctx.owner.step(table, U, [feature])
        return grad * scale.unsqueeze(1), None, None, None
