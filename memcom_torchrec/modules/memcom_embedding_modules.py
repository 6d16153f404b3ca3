"""``MEmComEmbeddingBagCollection``: a drop-in for TorchRec's EmbeddingBagCollection.

The unsharded module holds plain parameters, like TorchRec's own
``EmbeddingBagCollection``: it is the reference implementation, the source for
export, and what ``DistributedModelParallel`` shards (with
``MEmComEmbeddingBagCollectionSharder``) onto fused FBGEMM kernels for training.
"""

from dataclasses import dataclass
from typing import AbstractSet, Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from memcom_torchrec.modules.collection_base import CollectionBase
from memcom_torchrec.modules.memcom_configs import MEmComEmbeddingBagConfig, assignment_dtype, hash_multiplier
from memcom_torchrec.modules.validation import validate_feature_specs


@dataclass(frozen=True)
class FeatureSpec:
    """How one input feature is looked up.

    Args:
        feature (str): feature name.
        table (str): table name.
        num_embeddings (int): valid ids are ``[0, num_embeddings)``.
        num_buckets (int): rows of ``U`` (``num_embeddings`` for a plain table).
        grid_columns (int): columns ``Q`` of the ``w`` grid (0: no ``w``).
        is_memcom (bool): whether ids are hashed ``i -> i mod m``.
        mean_pooling (bool): whether the pooled sum is divided by the bag length.
        num_hashes (int): rows of ``U`` per entity (2: a second hash, see ``memcom_configs``).
        hash_columns (int): cells per row per hash ``C`` (the second hash's columns start at ``C``).
        hash_multiplier (int): ``a`` of the second hash's permutation ``(a*i) mod n`` (0: none).
        stored_assignment (bool): cells come from the table's stored assignment.
    """

    feature: str
    table: str
    num_embeddings: int
    num_buckets: int
    grid_columns: int
    is_memcom: bool
    mean_pooling: bool
    num_hashes: int = 1
    hash_columns: int = 0
    hash_multiplier: int = 0
    stored_assignment: bool = False

    @property
    def is_variant(self) -> bool:
        """Whether ids map to cells other than MEmCom's ``(i mod m, i // m)``."""
        return self.num_hashes != 1 or self.stored_assignment


def feature_specs(tables: List[EmbeddingBagConfig]) -> Dict[str, FeatureSpec]:
    """Per-feature lookup specs of a list of (MEmCom or plain) table configs."""
    specs: Dict[str, FeatureSpec] = {}
    for t in tables:
        memcom = isinstance(t, MEmComEmbeddingBagConfig)
        for f in t.feature_names or [t.name]:
            if f in specs:
                raise ValueError(
                    f"feature '{f}' is used by tables '{specs[f].table}' and '{t.name}'; "
                    "a feature may feed one table only"
                )
            specs[f] = FeatureSpec(
                feature=f,
                table=t.name,
                num_embeddings=t.num_embeddings,
                num_buckets=t.num_buckets if memcom else t.num_embeddings,
                grid_columns=t.entity_weight_shape[1] if memcom else 0,
                is_memcom=memcom,
                mean_pooling=t.pooling == PoolingType.MEAN,
                num_hashes=t.num_hashes if memcom else 1,
                hash_columns=t.hash_columns if memcom else 0,
                hash_multiplier=hash_multiplier(t.num_embeddings) if memcom and t.num_hashes > 1 else 0,
                stored_assignment=memcom and t.stores_assignment,
            )
    return specs


def check_assignment(config: MEmComEmbeddingBagConfig, cells: Any) -> Optional[str]:
    """Why ``cells`` is not a valid stored assignment of ``config`` (``None`` if it is).

    Valid: an integer tensor of ``n`` distinct cells in ``[0, assignment_cells)``.
    """
    where = f"MEmCom table '{config.name}' (assignment '{config.assignment}')"
    if not isinstance(cells, torch.Tensor):
        return f"{where}: the assignment must be a tensor, got {type(cells).__name__}"
    if cells.dtype not in (torch.int16, torch.int32, torch.int64):
        return f"{where}: the assignment must hold integer cells, got {cells.dtype}"
    if tuple(cells.shape) != (config.num_embeddings,):
        return (
            f"{where}: the assignment has shape {tuple(cells.shape)}, expected ({config.num_embeddings},) "
            "(one cell per entity): it belongs to another table or config"
        )
    if cells.device.type == "meta":
        return None
    c = cells.long()
    bad = (c < 0) | (c >= config.assignment_cells)
    if bool(bad.any()):
        entity = int(bad.nonzero()[0])
        return (
            f"{where}: entity {entity} is assigned cell {int(c[entity])}, outside the grid's "
            f"{config.assignment_cells} cells (num_buckets={config.num_buckets}): it belongs to another config"
        )
    if torch.unique(c).numel() != c.numel():
        return f"{where}: the assignment puts two entities in one cell (not one-to-one)"
    return None


def inner_table_configs(tables: List[EmbeddingBagConfig]) -> List[EmbeddingBagConfig]:
    """Configs of the weighted, sum-pooled tables the lookups run on.

    A MEmCom table becomes its shared table ``U`` (``num_buckets`` rows); a
    plain table is kept as is. Pooling is always SUM: mean pooling is applied
    after the lookup, so that it divides ``sum_j w_j U_j`` by the bag length.
    """
    inner = []
    for t in tables:
        num_embeddings = t.num_buckets if isinstance(t, MEmComEmbeddingBagConfig) else t.num_embeddings
        inner.append(
            EmbeddingBagConfig(
                num_embeddings=num_embeddings,
                embedding_dim=t.embedding_dim,
                name=t.name,
                data_type=t.data_type,
                feature_names=list(t.feature_names or [t.name]),
                weight_init_max=t.weight_init_max,
                weight_init_min=t.weight_init_min,
                init_fn=t.init_fn,
                pooling=PoolingType.SUM,
            )
        )
    return inner


def grid_cells(
    ids: torch.Tensor, spec: FeatureSpec, assignment: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Splits ids into the row of ``U`` and the column of the ``w`` grid.

    Args:
        ids (torch.Tensor): entity ids of one MEmCom feature.
        spec (FeatureSpec): the feature's spec.
        assignment (Optional[torch.Tensor]): the table's stored cells (``stored_assignment``).

    Returns:
        Tuple[torch.Tensor, torch.Tensor]: ``(i mod m, i // m)`` for MEmCom; for the
        variants, ``num_hashes`` pairs per id, an id's pairs next to each other
        (``len(ids) * num_hashes`` of each).
    """
    m = spec.num_buckets
    ids = ids.long()
    if spec.stored_assignment:
        if assignment is None:
            raise ValueError(f"table '{spec.table}' has no stored assignment")
        first = assignment.index_select(0, ids).long()  # a cell
    else:
        first = ids  # MEmCom's cell i: row i mod m, column i // m
    if spec.num_hashes == 1:
        return torch.remainder(first, m), torch.div(first, m, rounding_mode="floor")
    second = torch.remainder(ids * spec.hash_multiplier, spec.num_embeddings)
    rows = torch.stack([torch.remainder(first, m), torch.remainder(second, m)], dim=1)
    cols = torch.stack(
        [torch.div(first, m, rounding_mode="floor"), spec.hash_columns + torch.div(second, m, rounding_mode="floor")],
        dim=1,
    )
    return rows.reshape(-1), cols.reshape(-1)


def apply_mean_pooling(
    pooled: torch.Tensor,
    features: KeyedJaggedTensor,
    specs: Dict[str, FeatureSpec],
    feature_order: List[str],
    dims: List[int],
) -> torch.Tensor:
    """Divides the pooled sums of mean-pooled features by their bag lengths.

    Args:
        pooled (torch.Tensor): ``B x sum(dims)`` pooled sums in ``feature_order``.
        features (KeyedJaggedTensor): the input (for the bag lengths).
        specs (Dict[str, FeatureSpec]): feature specs.
        feature_order (List[str]): the feature of every output key.
        dims (List[int]): width of every output key.

    Returns:
        torch.Tensor: pooled values with mean pooling applied; empty bags stay 0.
    """
    if not any(specs[f].mean_pooling for f in feature_order):
        return pooled
    lengths = features.lengths().view(len(features.keys()), -1)
    key_index = {k: i for i, k in enumerate(features.keys())}
    divisors = []
    for f, d in zip(feature_order, dims):
        if specs[f].mean_pooling:
            divisor = lengths[key_index[f]].clamp(min=1).to(pooled.dtype)
        else:
            divisor = torch.ones(pooled.shape[0], dtype=pooled.dtype, device=pooled.device)
        divisors.append(divisor.unsqueeze(1).expand(-1, d))
    return pooled / torch.cat(divisors, dim=1)


class MEmComEmbeddingBagCollection(CollectionBase):
    """EmbeddingBagCollection whose tables may be MEmCom-compressed.

    Entity ``i`` of a MEmCom table is ``w[i] * U[i mod m]``; a bag pools
    ``sum_j c_j w[i_j] U[i_j mod m]`` (``c_j`` the input's own weights if
    ``is_weighted``), divided by the bag length for MEAN pooling. Plain
    ``EmbeddingBagConfig`` tables behave as in TorchRec. Parameters:
    ``_embedding_bag_collection.embedding_bags.<table>.weight`` (``U``, or the
    plain table) and ``_entity_weights.<table>`` (the ``(m, Q)`` grid of ``w``,
    see ``memcom_configs``); sharded modules keep the same names.

    Args:
        tables (List[EmbeddingBagConfig]): MEmCom and/or plain table configs.
        is_weighted (bool): whether input KJTs carry per-id weights.
        device (Optional[torch.device]): device, ``meta`` for lazy init.

    Example::

        ebc = MEmComEmbeddingBagCollection(tables=[
            MEmComEmbeddingBagConfig(name="items", num_embeddings=10_000,
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
    ) -> None:
        super().__init__(tables, is_weighted)
        self._feature_specs: Dict[str, FeatureSpec] = feature_specs(tables)
        self._embedding_bag_collection = EmbeddingBagCollection(
            tables=inner_table_configs(tables), is_weighted=True, device=device
        )
        self._entity_weights = nn.ParameterDict()
        for t in tables:
            if isinstance(t, MEmComEmbeddingBagConfig) and t.train_entity_weights:
                self._entity_weights[t.name] = nn.Parameter(
                    torch.empty(t.entity_weight_shape, device=device)
                )
        self._device: torch.device = torch.device(self._embedding_bag_collection.device)
        self._assignments = StoredAssignments(tables, self._device)
        self.reset_parameters()

    # ------------------------------------------------------------------ API
    @property
    def device(self) -> torch.device:
        return self._device

    def feature_specs(self) -> Dict[str, FeatureSpec]:
        """Returns: per-feature lookup specs."""
        return self._feature_specs

    def set_assignment(self, table_name: str, cells: torch.Tensor) -> None:
        """Stores a table's entity -> cell map (``"frequency"`` / ``"clustered"`` tables).

        Raises:
            ValueError: naming the table, if ``cells`` is not a valid assignment for it.
        """
        self._assignments.set(table_name, cells)

    def assignment(self, table_name: str) -> torch.Tensor:
        """The stored cells of a ``"frequency"`` / ``"clustered"`` table (``n``)."""
        return self._assignments.get(table_name)

    def reset_parameters(self) -> None:
        """Re-initialises ``U`` (each config's ``init_fn``) and sets ``w`` to its init value."""
        if self._device.type == "meta":
            return
        self._embedding_bag_collection.reset_parameters()
        with torch.no_grad():
            for t in self._embedding_bag_configs:
                if t.name in self._entity_weights:
                    self._entity_weights[t.name].fill_(t.entity_weight_init)

    def memcom_parameters(self, table_name: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """Dense views of a MEmCom table.

        Args:
            table_name (str): a MEmCom table.

        Returns:
            Tuple[torch.Tensor, torch.Tensor]: ``U`` (``m x d``) and ``w`` (``n``),
            ``w[i]`` the weight of entity ``i``.
        """
        config = next((t for t in self._embedding_bag_configs if t.name == table_name), None)
        if not isinstance(config, MEmComEmbeddingBagConfig):
            raise KeyError(f"'{table_name}' is not a MEmCom table of this collection")
        if config.is_variant:
            U, _, w = self._variant_tensors(table_name)
            return U, w
        U = self._embedding_bag_collection.embedding_bags[table_name].weight
        if table_name in self._entity_weights:
            w = entity_weights_to_dense(self._entity_weights[table_name], config.num_embeddings)
        else:
            w = torch.ones(config.num_embeddings, device=U.device)  # the hashing trick: no w
        return U, w

    def _variant_tensors(self, table_name: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``U``, every entity's rows of ``U`` and its scalars (``n x num_hashes`` each) of a variant table."""
        rows, cols = self.entity_cells(table_name)
        grid = self._entity_weights[table_name]
        U = self._embedding_bag_collection.embedding_bags[table_name].weight
        return U, rows, grid.reshape(-1)[rows * grid.shape[1] + cols]

    @torch.no_grad()
    def set_memcom_table(self, table_name: str, U: torch.Tensor, w: torch.Tensor) -> None:
        """Writes a MEmCom table's ``U`` (``m x d``) and every entity's scalars ``w`` (``n`` or ``n x num_hashes``).

        The scalars go to the entities' cells (``entity_cells``: set a stored assignment
        first); padding cells of the grid are set to 1.

        Raises:
            ValueError: naming the table, on a shape that does not fit its config.
        """
        grid = self._entity_weights[table_name]
        bag = self._embedding_bag_collection.embedding_bags[table_name]
        rows, cols = self.entity_cells(table_name)
        if tuple(U.shape) != tuple(bag.weight.shape) or w.numel() != rows.numel():
            raise ValueError(
                f"table '{table_name}': U {tuple(U.shape)} / w {tuple(w.shape)} do not fit "
                f"U {tuple(bag.weight.shape)} / w {tuple(rows.shape)}"
            )
        bag.weight.copy_(U)
        grid.fill_(1.0)
        grid[rows.reshape(-1), cols.reshape(-1)] = w.reshape(-1).to(grid.dtype)

    def entity_cells(self, table_name: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """Row of ``U`` and column of the ``w`` grid of every entity of a MEmCom table.

        Returns:
            Tuple[torch.Tensor, torch.Tensor]: ``(rows, cols)``, each ``n x num_hashes`` (int64).
        """
        spec = next(s for s in self._feature_specs.values() if s.table == table_name and s.is_memcom)
        ids = torch.arange(spec.num_embeddings, device=self._device)
        rows, cols = grid_cells(ids, spec, self._assignments.maybe_get(table_name))
        return rows.view(spec.num_embeddings, -1), cols.view(spec.num_embeddings, -1)

    def dense_tables(self, table_name: str) -> Dict[str, torch.Tensor]:
        """Every tensor of one table by role, as an exporter needs them.

        Args:
            table_name (str): any table of this collection.

        Returns:
            Dict[str, torch.Tensor]: ``{"U", "w"}`` (MEmCom: entity ``i`` is
            ``w[i] * U[i mod m]``), ``{"U"}`` (hashing: ``U[i mod m]``) or
            ``{"weight"}`` (a plain ``n x d`` table), ``{"U", "rows", "w"}`` (the
            MEmCom-family variants: entity ``i`` is ``sum_j w[i, j] * U[rows[i, j]]``,
            ``rows`` and ``w`` of shape ``n x num_hashes``).

        Raises:
            KeyError: no such table.
        """
        config = next((t for t in self._embedding_bag_configs if t.name == table_name), None)
        if config is None:
            raise KeyError(f"no table '{table_name}' in this collection")
        if not isinstance(config, MEmComEmbeddingBagConfig):
            return {"weight": self._embedding_bag_collection.embedding_bags[table_name].weight}
        if config.is_variant:
            U, rows, w = self._variant_tensors(table_name)
            return {"U": U, "rows": rows, "w": w}
        U, w = self.memcom_parameters(table_name)
        return {"U": U, "w": w} if table_name in self._entity_weights else {"U": U}

    # -------------------------------------------------------------- forward
    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pools the embeddings of every feature.

        Args:
            features (KeyedJaggedTensor): ids (and weights if ``is_weighted``) of
                every feature of the collection.

        Returns:
            KeyedTensor: one pooled ``B x d`` block per feature.

        Raises:
            ValueError: on unknown/missing keys, ids out of range, bad dtypes.
        """
        error = validate_feature_specs(features, self._feature_specs, self._is_weighted)
        if error is not None:
            raise ValueError(error)
        inner = self._embedding_bag_collection
        feature_order = [f for names in inner._feature_names for f in names]
        if features.stride() == 0:  # TorchRec's EBC cannot split an empty batch
            empty = [
                bag.weight[:0] for bag, names in zip(inner.embedding_bags.values(), inner._feature_names) for _ in names
            ]  # (0, d) slices of the tables: an empty output still connected to autograd
            return KeyedTensor(
                keys=inner._embedding_names, length_per_key=inner._lengths_per_embedding, values=torch.cat(empty, 1)
            )
        kt = inner(self._memcom_kjt(features))
        values = apply_mean_pooling(
            kt.values(), features, self._feature_specs, feature_order, kt.length_per_key()
        )
        return KeyedTensor(keys=kt.keys(), length_per_key=kt.length_per_key(), values=values)

    def _memcom_kjt(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """Hashes MEmCom ids and turns ``w[i]`` (times input weights) into per-id weights."""

        def weight_fn(spec: FeatureSpec, rows: torch.Tensor, cols: torch.Tensor, weight: Optional[torch.Tensor]):
            if spec.table not in self._entity_weights:
                return weight
            w = self._entity_weights[spec.table].view(-1)[rows * spec.grid_columns + cols]
            return w if weight is None else w * weight

        return hash_features(
            features, self._feature_specs, self._is_weighted, weight_fn, assignments=self._assignments.tensors()
        )


class StoredAssignments(nn.Module):
    """The stored entity -> cell maps of a collection's ``"frequency"``/``"clustered"`` tables.

    One buffer per table (``_assignments.<table>`` in ``state_dict``), int16 or int32
    (``memcom_configs.assignment_dtype``), initialised to MEmCom's own cells
    (entity ``i`` in cell ``i``). Every tensor loaded into it (``load_state_dict``,
    DCP) is checked against its config first (``check_assignment``).

    Args:
        tables (List[EmbeddingBagConfig]): the collection's tables.
        device (torch.device): where the buffers live.
    """

    def __init__(self, tables: List[EmbeddingBagConfig], device: torch.device) -> None:
        super().__init__()
        self._configs: Dict[str, MEmComEmbeddingBagConfig] = {
            t.name: t for t in tables if isinstance(t, MEmComEmbeddingBagConfig) and t.stores_assignment
        }
        for name, t in self._configs.items():
            self.register_buffer(
                name, torch.arange(t.num_embeddings, device=device).to(assignment_dtype(t.assignment_cells))
            )
        self._register_load_state_dict_pre_hook(self._check_loaded)

    def tensors(self) -> Dict[str, torch.Tensor]:
        """Table -> cells."""
        return {name: getattr(self, name) for name in self._configs}

    def maybe_get(self, table: str) -> Optional[torch.Tensor]:
        """A table's cells, or ``None`` if it stores none."""
        return getattr(self, table) if table in self._configs else None

    def get(self, table: str) -> torch.Tensor:
        """A table's cells.

        Raises:
            KeyError: the table stores no assignment.
        """
        if table not in self._configs:
            raise KeyError(f"table '{table}' stores no assignment (only 'frequency' / 'clustered' tables do)")
        return getattr(self, table)

    def set(self, table: str, cells: torch.Tensor) -> None:
        """Replaces a table's cells after checking them (``ValueError`` naming the table)."""
        current = self.get(table)
        error = check_assignment(self._configs[table], cells)
        if error is not None:
            raise ValueError(error)
        with torch.no_grad():
            current.copy_(cells.to(current.dtype))

    def _check_loaded(self, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
        for name, config in self._configs.items():
            key = prefix + name
            if key in state_dict:
                error = check_assignment(config, state_dict[key])
                if error is None and state_dict[key].dtype != getattr(self, name).dtype:
                    error = (
                        f"MEmCom table '{name}': the checkpoint's assignment is {state_dict[key].dtype}, "
                        f"the config's {getattr(self, name).dtype} (another grid size)"
                    )
                if error is not None:
                    raise ValueError(f"cannot load {key}: {error}")


def hash_features(
    features: KeyedJaggedTensor,
    specs: Dict[str, FeatureSpec],
    is_weighted: bool,
    weight_fn: Callable[[FeatureSpec, torch.Tensor, torch.Tensor, Optional[torch.Tensor]], Optional[torch.Tensor]],
    skip: AbstractSet[str] = frozenset(),
    weighted: bool = True,
    assignments: Optional[Mapping[str, torch.Tensor]] = None,
) -> KeyedJaggedTensor:
    """The weighted KJT the lookups of ``U`` consume.

    MEmCom ids ``i`` become ``i mod m``; every id gets a weight:
    ``weight_fn(spec, i mod m, i // m, input_weight)`` for MEmCom features, the
    input weight (or 1) otherwise. The variants map ids through ``grid_cells``
    (stored cells, or ``num_hashes`` rows per id: those bags grow ``num_hashes``-fold).

    Args:
        features (KeyedJaggedTensor): validated input.
        specs (Dict[str, FeatureSpec]): feature specs.
        is_weighted (bool): whether ``features`` carries weights.
        weight_fn: per-id weight of a MEmCom feature (``None``: input weight or 1).
        skip (AbstractSet[str]): features left unhashed (a sharded table
            hashes them where it lives); they keep their input weight (or 1).
        weighted (bool): False returns no weights (only valid where no id
            needs one: an unweighted input and no ``weight_fn`` value).
        assignments (Optional[Mapping[str, torch.Tensor]]): table -> stored cells.

    Returns:
        KeyedJaggedTensor: same keys, hashed ids, float32 weights; the lengths of
        features with ``num_hashes > 1`` multiplied by it.
    """
    offsets = features.offset_per_key()
    all_ids = features.values().long()
    all_weights = features.weights() if is_weighted else None
    values, weights = [], []
    lengths = features.lengths()
    repeat = [specs[key].num_hashes if specs[key].is_memcom and key not in skip else 1 for key in features.keys()]
    for k, key in enumerate(features.keys()):
        spec = specs[key]
        seg = slice(offsets[k], offsets[k + 1])
        ids = all_ids[seg]
        weight = None if all_weights is None else all_weights[seg]
        if spec.is_memcom and key not in skip:
            rows, cols = grid_cells(ids, spec, (assignments or {}).get(spec.table))
            if weight is not None and repeat[k] > 1:
                weight = weight.repeat_interleave(repeat[k])
            weight = weight_fn(spec, rows, cols, weight)
            ids = rows
        if weight is None:
            weight = torch.ones(ids.shape, dtype=torch.float32, device=ids.device)
        values.append(ids)
        weights.append(weight.float())
    if any(r > 1 for r in repeat):
        scale = torch.tensor(repeat, dtype=lengths.dtype, device=lengths.device)
        lengths = (lengths.view(len(repeat), -1) * scale.unsqueeze(1)).reshape(-1)
    return KeyedJaggedTensor(
        keys=features.keys(),
        values=torch.cat(values),
        weights=torch.cat(weights) if weighted else None,
        lengths=lengths,
        stride=features.stride(),
    )


def entity_weights_to_dense(grid: torch.Tensor, num_embeddings: int) -> torch.Tensor:
    """``(m, Q)`` grid of ``w`` -> dense ``n`` vector (entity ``i`` at ``(i % m, i // m)``)."""
    return grid.t().reshape(-1)[:num_embeddings]

