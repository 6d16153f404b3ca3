"""What a table stores: one description per table config, read by everything that sizes or checks a table.

``table_storage(config)`` describes a table by its tensors' roles (the same roles
a collection's ``dense_tables`` hands over, see ``modules/dense_tables.py``):

- ``weight``: a plain ``n x d`` table;
- ``U``: the ``m x d`` shared rows (hashing, MEmCom and its variants);
- ``Q``, ``R``: the quotient (``ceil(n/p) x d``) and remainder (``p x d``) tables;
- ``A``, ``P``: a low-rank table's ``n x k`` rows and its ``d x k`` projection;
- ``w``: the per-entity scalars (``n``, or ``n x k`` for ``k`` cells per entity);
- ``rows``: the ``n x k`` rows of ``U`` each entity reads (variants), computed from
  the id by a hash or read from a stored ``assignment`` (``n`` int16/int32);
- ``head``, ``tail``, ``P``, ``slots``: a mixed-dimension table's full-width rows of its most
  frequent entities, narrow rows of the rest, the narrow rows' projection and the stored
  entity -> slot map.

Who reads it: the memory accounting and every compression ratio
(``modules/memory.py`` and the ratio solvers of the configs), the checkpoint
signature (``models/checkpoint.py``), the slim lookups' shape checks (``export/``),
the replica's pack (``scripts/reference_sweep.py``) and the sharders' planner
columns (``distributed/``).

**One ratio, one basis.** ``compression_ratio = n*d / stored_floats``, where
``stored_floats`` counts every trained tensor at its logical shape (one float per
element: ``w`` is ``n x k``, as the phone program stores it) plus a stored
assignment's bytes / 4. What a tensor occupies while training, where the layout
pads it (``w`` lives in an ``m x C`` grid next to ``U``'s rows, so that sharding
``U`` by rows carries each entity's scalar; at most ``m - 1`` cells per hash never
looked up), is its ``held_shape``: it counts in the memory accounting, not in the
ratio.

A new table config registers how it is stored with ``register_storage``.
"""

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple, Type

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig

# What a tensor is for.
PARAMETER, ASSIGNMENT, COMPUTED = "parameter", "assignment", "computed"


@dataclass(frozen=True)
class TableTensor:
    """One tensor of a table.

    Args:
        role (str): ``weight``, ``U``, ``Q``, ``R``, ``A``, ``P``, ``w``, ``rows``, ``assignment``,
            ``head``, ``tail`` or ``slots`` (see the module docstring).
        shape (Tuple[int, ...]): its logical shape (what ``dense_tables`` hands over).
        kind (str): ``PARAMETER`` (trained), ``ASSIGNMENT`` (stored, not trained) or
            ``COMPUTED`` (derived from the id; stores nothing while training).
        dtype (torch.dtype): its stored dtype (parameters: float32 on the ratio's basis).
        held_shape (Optional[Tuple[int, ...]]): the padded shape the training layout
            holds it in (``None``: ``shape``).
        is_row_table (bool): a table of rows that FBGEMM's fused TBE looks up and updates
            (in the config's data type, with the fused optimizer's state).
        handed_over (Optional[bool]): whether ``dense_tables`` hands it to the export (default:
            every tensor but an assignment, whose content reaches the export as ``rows``).
        dense_layer (bool): trained by the dense optimizer (Adam) with the model's layers, not by
            the fused one (a projection ``P``).
    """

    role: str
    shape: Tuple[int, ...]
    kind: str = PARAMETER
    dtype: torch.dtype = torch.float32
    held_shape: Optional[Tuple[int, ...]] = None
    is_row_table: bool = False
    handed_over: Optional[bool] = None
    dense_layer: bool = False

    @property
    def exported(self) -> bool:
        """Whether ``dense_tables`` hands it over (see ``handed_over``)."""
        return self.handed_over if self.handed_over is not None else self.kind != ASSIGNMENT

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def held_numel(self) -> int:
        return math.prod(self.held_shape if self.held_shape is not None else self.shape)



@dataclass(frozen=True)
class TableStorage:
    """Everything one table stores (see the module docstring).

    Args:
        name (str): the table.
        num_embeddings (int): entities ``n``.
        embedding_dim (int): ``d``.
        tensors (Tuple[TableTensor, ...]): its tensors.
        options (Tuple[Tuple[str, Any], ...]): settings that change what equal shapes mean
            (e.g. how entities are assigned to rows), for the checkpoint signature.
    """

    name: str
    num_embeddings: int
    embedding_dim: int
    tensors: Tuple[TableTensor, ...]
    options: Tuple[Tuple[str, Any], ...] = ()

    def tensor(self, role: str) -> TableTensor:
        """The tensor of ``role`` (``KeyError`` naming the table's roles if absent)."""
        for t in self.tensors:
            if t.role == role:
                return t
        raise KeyError(f"table '{self.name}' has no tensor '{role}' (it has {list(self.roles)})")

    def has(self, role: str) -> bool:
        return any(t.role == role for t in self.tensors)

    @property
    def roles(self) -> Tuple[str, ...]:
        """Sorted roles of the tensors ``dense_tables`` hands over."""
        return tuple(sorted(t.role for t in self.tensors if t.exported))

    @property
    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        """Logical shape of every tensor ``dense_tables`` hands over, by role."""
        return {t.role: t.shape for t in self.tensors if t.exported}

    @property
    def num_parameters(self) -> int:
        """Trained scalars (logical shapes)."""
        return sum(t.numel for t in self.tensors if t.kind == PARAMETER)

    @property
    def assignment_bytes(self) -> int:
        """Bytes of a stored entity -> cell map (0: computed)."""
        return sum(t.numel * t.dtype.itemsize for t in self.tensors if t.kind == ASSIGNMENT)

    @property
    def stored_floats(self) -> float:
        """The ratio's basis: trained scalars plus a stored assignment's bytes / 4."""
        return self.num_parameters + self.assignment_bytes / 4

    @property
    def compression_ratio(self) -> float:
        """``n*d / stored_floats``: the one formula every ratio of the package comes from."""
        return self.num_embeddings * self.embedding_dim / self.stored_floats

    @property
    def num_rows(self) -> int:
        """Rows of FBGEMM tables stored (``n`` plain, low-rank or mixed-dimension, ``m`` for ``U``,
        ``ceil(n/p) + p`` for ``Q`` and ``R``)."""
        return sum(t.shape[0] for t in self.tensors if t.is_row_table)


# ----------------------------------------------------------------- registry
_STORAGE: Dict[type, Callable[[EmbeddingBagConfig], TableStorage]] = {}


def register_storage(config_class: Type[EmbeddingBagConfig], describe: Callable[[EmbeddingBagConfig], TableStorage]
                     ) -> None:
    """Registers how tables of ``config_class`` (exactly that class) are stored."""
    if config_class in _STORAGE:
        raise ValueError(f"storage of {config_class.__name__} is already registered")
    _STORAGE[config_class] = describe


def table_storage(config: EmbeddingBagConfig) -> TableStorage:
    """The storage description of a table config.

    Raises:
        ValueError: no storage is registered for the config's class.
    """
    describe = _STORAGE.get(type(config))
    if describe is None:
        raise ValueError(
            f"table '{config.name}': no storage description for {type(config).__name__}; register one with "
            "memcom_torchrec.modules.storage.register_storage"
        )
    return describe(config)


def plain_storage(config: EmbeddingBagConfig) -> TableStorage:
    """An uncompressed ``n x d`` table."""
    n, d = config.num_embeddings, config.embedding_dim
    return TableStorage(config.name, n, d, (TableTensor("weight", (n, d), is_row_table=True),))


register_storage(EmbeddingBagConfig, plain_storage)
