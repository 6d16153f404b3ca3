"""Slim lookups: ids -> per-id embeddings of one table, with core ATen ops only.

Per-id embeddings by the roles of a table's tensors, as each collection hands
them over (``dense_tables``; ``n`` entities), whatever method built the table,
one lookup class per storage layout (``make_lookup`` picks it from the roles):

- ``PlainLookup``, ``weight``: ``weight[i]`` (a plain table);
- ``HashedLookup``, ``U``: ``U[i mod m]`` (hashing trick; with ``w``: MEmCom);
- ``QRLookup``, ``Q``, ``R``: ``Q[i // p] * R[i mod p]`` (quotient-remainder;
  with ``w``: memcom_qr);
- ``w``: the above times ``w[i]``;
- ``MultiRowLookup``, ``U``, ``rows``, ``w``: ``sum_j w[i, j] * U[rows[i, j]]`` (the
  MEmCom-family variants: a second hash, or a stored assignment), ``rows`` kept
  in the program as int16 (int32 when ``m`` > 32,767);
- ``LowRankLookup``, ``A``, ``P``: ``P A[i]`` (a low-rank table; ``P`` is ``d x k``);
- ``MixedDimLookup``, ``head``, ``tail``, ``P``, ``slots``: ``head[s]`` or ``P tail[s - h]``
  (a mixed-dimension table; ``slots`` kept as int16 up to 32,767 entities).

Each lookup also scores a query against every entity (``catalogue_scores``, for the
``tied`` / ``dot`` scorers). For ``U`` layouts it is computed as
``w_i * (q U^T)[i mod m]``: ``O(m*d + n)`` per request, not ``O(n*d)``.

Invalid ids: every lookup index of an invalid id is replaced by the table's row
count, which the bounds check of the ``embedding`` kernel (and of the quantised
embedding kernels) rejects; nothing is clamped (``check_ids`` raises in eager).
"""

from dataclasses import dataclass, field
from typing import ClassVar, Dict, Tuple

import torch
from torch import nn

from memcom_torchrec.modules.dense_tables import dense_tables
from memcom_torchrec.modules.memcom_configs import assignment_dtype
from memcom_torchrec.modules.storage import TableStorage, table_storage

Layout = Tuple[str, ...]


# ---------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------
class RowTable(nn.Module):
    """A ``rows x d`` embedding table (an ``nn.Embedding``, so torchao can quantise it).

    Args:
        weight (torch.Tensor): the float table.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.num_rows = int(weight.shape[0])
        self.table = nn.Embedding(self.num_rows, int(weight.shape[1]))
        self.table.weight = nn.Parameter(weight.detach().float().clone().contiguous(), requires_grad=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` as float32 (``len(idx) x d``); an index outside ``[0, rows)`` fails."""
        return self.table(idx)

    def all_rows(self) -> torch.Tensor:
        """The whole table as float32 (dequantised through the same kernel as a lookup)."""
        return self.table(torch.arange(self.num_rows))


class ScalarTable(nn.Module):
    """One scalar per entity (MEmCom's ``w``) as an ``n x 1`` float32 or float16 buffer.

    Args:
        values (torch.Tensor): ``n`` values.
    """

    def __init__(self, values: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", values.detach().float().reshape(-1, 1).clone().contiguous())

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """``len(idx) x 1`` float32 values; an index outside ``[0, n)`` fails."""
        return nn.functional.embedding(idx, self.weight).float()

    def column(self) -> torch.Tensor:
        """All ``n`` values as a float32 row vector (``1 x n``)."""
        return self.weight.float().reshape(1, -1)


@dataclass(frozen=True)
class TableInfo:
    """What a slim lookup needs to know about its table.

    Args:
        name (str): table name (for error messages).
        roles (Tuple[str, ...]): its tensors' roles, one of ``LAYOUTS``.
        num_embeddings (int): valid ids are ``[0, num_embeddings)``.
        embedding_dim (int): ``d``.
        mean_pooling (bool): divide bag sums by their lengths.
        shapes (Dict[str, Tuple[int, ...]]): each role's shape, from the table's storage
            description (``modules/storage.py``'s ``TableStorage.shapes``).
    """

    name: str
    roles: Tuple[str, ...]
    num_embeddings: int
    embedding_dim: int
    mean_pooling: bool
    shapes: Dict[str, Tuple[int, ...]] = field(default_factory=dict)

    @staticmethod
    def of(storage: TableStorage, mean_pooling: bool) -> "TableInfo":
        """The info of a table described by ``storage``."""
        return TableInfo(storage.name, storage.roles, storage.num_embeddings, storage.embedding_dim, mean_pooling,
                         storage.shapes)


# ---------------------------------------------------------------------------
# Lookups: ids -> per-id embeddings
# ---------------------------------------------------------------------------
class SlimLookup(nn.Module):
    """Base of the per-layout lookups: checks the table's tensors, validates ids, scores the catalogue.

    Build one with ``make_lookup``, which picks the class from the table's roles. A
    subclass stores its tensors in ``store`` and computes ids -> embeddings in ``forward``;
    the base stores ``w`` (``entity_weights``) where the layout has one.

    Args:
        info (TableInfo): the table.
        tables (Dict[str, torch.Tensor]): its tensors by role (the class's ``LAYOUTS``).
    """

    LAYOUTS: ClassVar[Tuple[Layout, ...]] = ()

    def __init__(self, info: TableInfo, tables: Dict[str, torch.Tensor]) -> None:
        super().__init__()
        if info.roles not in self.LAYOUTS:
            raise ValueError(
                f"table '{info.name}': {type(self).__name__} takes tensors {[list(r) for r in self.LAYOUTS]}, "
                f"got {list(info.roles)}"
            )
        self.info = info
        missing = [k for k in info.roles if k not in tables]
        if missing:
            raise ValueError(f"table '{info.name}' ({'+'.join(info.roles)}) lacks tensor(s) {missing}")
        expected = info.shapes
        for k in info.roles:
            if tuple(tables[k].shape) != tuple(expected[k]):
                raise ValueError(
                    f"table '{info.name}' ({'+'.join(info.roles)}): tensor {k} has shape {tuple(tables[k].shape)}, "
                    f"expected {expected[k]}"
                )
        self.store(tables)
        self.register_buffer("id_guard", torch.zeros(info.num_embeddings, 0))
        if "w" in info.roles:
            self.entity_weights = ScalarTable(tables["w"])

    def store(self, tables: Dict[str, torch.Tensor]) -> None:
        """Keeps the layout's tensors other than ``w`` (as ``RowTable`` modules and buffers)."""
        raise NotImplementedError

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``len(ids) x d`` float32 embeddings; an invalid id fails the guard's bounds-checked lookup first."""
        return self.lookup(self.guarded(ids))

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """The layout's ``len(ids) x d`` embeddings (``ids`` already guarded)."""
        raise NotImplementedError

    def guarded(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids``, after a bounds-checked lookup of each in a zero-width ``n x 0`` table.

        ExecuTorch's quantised embedding kernels abort the process on an index out of range
        (``embedding_byte``) or do not check it (``embedding_4bit`` at some widths); the portable
        ``embedding`` kernel fails the call instead. Every id goes through it first, and the layout's
        lookups depend on its (empty) result, so an invalid id fails before any quantised kernel runs.
        The guard stores no bytes.
        """
        poisoned = torch.where(self.valid(ids), ids, self.info.num_embeddings)
        return ids + nn.functional.embedding(poisoned, self.id_guard).sum(1).to(ids.dtype)

    def weigh(self, ids: torch.Tensor, valid: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``w[ids] * v`` if the table stores ``w`` (``v`` otherwise).

        ``w`` has exactly ``n`` rows: the poisoned index ``n`` of an invalid id fails its lookup.
        """
        if not hasattr(self, "entity_weights"):
            return v
        return self.entity_weights(torch.where(valid, ids, self.info.num_embeddings)) * v

    def valid(self, ids: torch.Tensor) -> torch.Tensor:
        """Which ids are in ``[0, n)``."""
        return (ids >= 0) & (ids < self.info.num_embeddings)

    def check_ids(self, feature: str, ids: torch.Tensor) -> None:
        """Eager validation: raises ``ValueError`` naming the feature, id and table."""
        if ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"feature '{feature}': ids must be int64 (or int32), got {ids.dtype}")
        if ids.dim() != 1:
            raise ValueError(f"feature '{feature}': ids must be 1-D, got shape {tuple(ids.shape)}")
        if ids.numel() == 0:
            return
        bad = (ids < 0) | (ids >= self.info.num_embeddings)
        if bool(bad.any()):
            value = int(ids[bad][0])
            raise ValueError(
                f"feature '{feature}': id {value} is out of range for table '{self.info.name}' "
                f"(num_embeddings={self.info.num_embeddings})"
            )

    def catalogue(self) -> torch.Tensor:
        """Every entity's vector, ``n x d`` (what ``self(arange(n))`` computes; every id valid: no guard)."""
        return self.lookup(torch.arange(self.info.num_embeddings))

    def catalogue_scores(self, q: torch.Tensor) -> torch.Tensor:
        """``<q_b, e_i>`` for every row ``b`` and entity ``i``: ``B x n``."""
        return nn.functional.linear(q, self.catalogue())


class PlainLookup(SlimLookup):
    """``weight[i]``: a plain ``n x d`` table (an uncompressed table of any collection)."""

    LAYOUTS: ClassVar[Tuple[Layout, ...]] = (("weight",),)

    def store(self, tables: Dict[str, torch.Tensor]) -> None:
        self.rows = RowTable(tables["weight"])

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """``len(ids) x d`` float32 embeddings; invalid ids make a lookup go out of bounds."""
        return self.rows(torch.where(self.valid(ids), ids, self.info.num_embeddings))


class HashedLookup(SlimLookup):
    """``U[i mod m]`` (the hashing trick), times ``w[i]`` if the table stores ``w`` (MEmCom)."""

    LAYOUTS: ClassVar[Tuple[Layout, ...]] = (("U",), ("U", "w"))

    def store(self, tables: Dict[str, torch.Tensor]) -> None:
        self.rows = RowTable(tables["U"])

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """``len(ids) x d`` float32 embeddings; invalid ids make a lookup go out of bounds."""
        m = self.rows.num_rows
        valid = self.valid(ids)
        return self.weigh(ids, valid, self.rows(torch.where(valid, torch.remainder(ids, m), m)))

    def catalogue_scores(self, q: torch.Tensor) -> torch.Tensor:
        """``B x n`` scores from the ``m`` shared rows, scored once and gathered: ``w_i * (q U^T)[i mod m]``."""
        n, m = self.info.num_embeddings, self.rows.num_rows
        scores = nn.functional.linear(q, self.rows.all_rows()).index_select(1, torch.remainder(torch.arange(n), m))
        return scores * self.entity_weights.column() if hasattr(self, "entity_weights") else scores


class QRLookup(SlimLookup):
    """``Q[i // p] * R[i mod p]`` (quotient-remainder), times ``w[i]`` if the table stores ``w`` (memcom_qr)."""

    LAYOUTS: ClassVar[Tuple[Layout, ...]] = (("Q", "R"), ("Q", "R", "w"))

    def store(self, tables: Dict[str, torch.Tensor]) -> None:
        self.quotient = RowTable(tables["Q"])
        self.remainder = RowTable(tables["R"])

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """``len(ids) x d`` float32 embeddings; invalid ids make a lookup go out of bounds."""
        p = self.remainder.num_rows
        valid = self.valid(ids)
        q = self.quotient(torch.where(valid, torch.div(ids, p, rounding_mode="floor"), self.quotient.num_rows))
        return self.weigh(ids, valid, q * self.remainder(torch.remainder(ids, p)))


class MultiRowLookup(SlimLookup):
    """``sum_j w[i, j] * U[rows[i, j]]``: the MEmCom-family variants (a second hash, a stored assignment)."""

    LAYOUTS: ClassVar[Tuple[Layout, ...]] = (("U", "rows", "w"),)

    def store(self, tables: Dict[str, torch.Tensor]) -> None:
        self.rows = RowTable(tables["U"])
        self.num_hashes = int(tables["rows"].shape[1])  # rows is n x k (the storage description's shape)
        # entity -> rows of U, as small as m allows (int16 up to 32,767 rows)
        self.register_buffer("bucket_rows", tables["rows"].to(assignment_dtype(self.rows.num_rows)).reshape(-1).clone())

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """``len(ids) x d`` float32 embeddings; the poisoned index ``n*k`` of an invalid id fails every lookup."""
        n, m, k = self.info.num_embeddings, self.rows.num_rows, self.num_hashes
        slots = (torch.where(self.valid(ids), ids, n).unsqueeze(1) * k + torch.arange(k)).reshape(-1)
        inside = slots < n * k
        parts = self.rows(self.bucket_rows.index_select(0, torch.where(inside, slots, 0)).long()
                          + torch.where(inside, 0, m))
        return (self.entity_weights(slots) * parts).view(-1, k, self.info.embedding_dim).sum(1)

    def catalogue_scores(self, q: torch.Tensor) -> torch.Tensor:
        """``B x n`` scores from the ``m`` shared rows: ``sum_j w[i, j] (q U^T)[rows[i, j]]``."""
        per_row = nn.functional.linear(q, self.rows.all_rows())
        parts = per_row.index_select(1, self.bucket_rows.long()) * self.entity_weights.column()
        return parts.view(q.shape[0], self.info.num_embeddings, self.num_hashes).sum(2)


class LowRankLookup(SlimLookup):
    """``P A[i]``: a low-rank table's ``n x k`` rows and its ``d x k`` projection (both row tables)."""

    LAYOUTS: ClassVar[Tuple[Layout, ...]] = (("A", "P"),)

    def store(self, tables: Dict[str, torch.Tensor]) -> None:
        self.rows = RowTable(tables["A"])
        self.projection = RowTable(tables["P"])

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """``len(ids) x d`` float32 embeddings; invalid ids make a lookup go out of bounds."""
        a = self.rows(torch.where(self.valid(ids), ids, self.info.num_embeddings))
        return nn.functional.linear(a, self.projection.all_rows())

    def catalogue_scores(self, q: torch.Tensor) -> torch.Tensor:
        """``B x n`` scores as ``(q P) A^T``: ``O(k (d + n))`` per request, not ``O(n d)``."""
        return nn.functional.linear(q @ self.projection.all_rows(), self.rows.all_rows())


class MixedDimLookup(SlimLookup):
    """``head[s]`` if ``s = slots[i] < h``, else ``P tail[s - h]``: a mixed-dimension table."""

    LAYOUTS: ClassVar[Tuple[Layout, ...]] = (("P", "head", "slots", "tail"),)

    def store(self, tables: Dict[str, torch.Tensor]) -> None:
        self.head = RowTable(tables["head"])
        self.tail = RowTable(tables["tail"])
        self.projection = RowTable(tables["P"])
        self.register_buffer("slots", tables["slots"].to(assignment_dtype(self.info.num_embeddings)).clone())

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """``len(ids) x d`` float32 embeddings; an invalid id's head index is the head's row count, which fails."""
        h = self.head.num_rows
        valid = self.valid(ids)
        s = self.slots.index_select(0, torch.where(valid, ids, 0)).long()
        in_head = s < h
        head = self.head(torch.where(valid, torch.where(in_head, s, 0), h))
        tail = nn.functional.linear(self.tail(torch.where(in_head, 0, s - h)), self.projection.all_rows())
        return torch.where(in_head.unsqueeze(1), head, tail)


LOOKUPS: Tuple[type, ...] = (PlainLookup, HashedLookup, QRLookup, MultiRowLookup, LowRankLookup, MixedDimLookup)
# The table layouts a slim lookup computes: sorted tensor roles (see the module docstring).
LAYOUTS: Tuple[Layout, ...] = tuple(layout for cls in LOOKUPS for layout in cls.LAYOUTS)


def make_lookup(info: TableInfo, tables: Dict[str, torch.Tensor]) -> SlimLookup:
    """The lookup of ``info``'s layout over ``tables``.

    Raises:
        ValueError: no lookup computes the layout, or a tensor is missing or misshapen.
    """
    cls = next((c for c in LOOKUPS if info.roles in c.LAYOUTS), None)
    if cls is None:
        raise ValueError(
            f"table '{info.name}': no slim lookup for tensors {list(info.roles)}, expected one of "
            f"{[list(r) for r in LAYOUTS]}"
        )
    return cls(info, tables)


def lookup_for_feature(collection: nn.Module, feature: str) -> SlimLookup:
    """The slim lookup of the table that feeds ``feature`` (a detached CPU copy of its tensors).

    Raises:
        ValueError: no table feeds the feature, the table is on the meta device, or its layout is unknown.
    """
    configs = collection.embedding_bag_configs()
    config = next((t for t in configs if feature in (t.feature_names or [t.name])), None)
    if config is None:
        have = sorted(f for t in configs for f in (t.feature_names or [t.name]))
        raise ValueError(f"no table feeds feature '{feature}' (the collection has features {have})")
    tensors = dense_tables(collection, config.name)
    for t in tensors.values():
        if t.device.type == "meta":
            raise ValueError(f"table '{config.name}' is on the meta device: load a checkpoint into it first")
    pooling = getattr(config.pooling, "name", str(config.pooling))
    info = TableInfo.of(table_storage(config), mean_pooling=pooling == "MEAN")
    if tuple(sorted(tensors)) != info.roles:
        raise ValueError(f"table '{config.name}': its collection hands over tensors {sorted(tensors)}, its storage "
                         f"description has {list(info.roles)}")
    return make_lookup(info, {k: v.detach().cpu() for k, v in tensors.items()})
