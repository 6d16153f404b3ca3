"""Slim single-device recommenders: plain tensors in, a score per item out, core ATen ops only.

A trained model holds TorchRec/FBGEMM collections that a phone runtime cannot
run (``aten::_embedding_bag`` and FBGEMM ops have no ExecuTorch kernels).
``build_slim_model`` copies its tables into small lookup modules that use only
``embedding`` (a bounds-checked gather), element-wise ops and a segment sum
(``cumsum`` + ``scatter_add`` to find each id's bag, ``index_put`` with
``accumulate=True`` to sum it), then the query network and the scorer.

Per-id embeddings by the roles of a table's tensors, as each collection hands
them over (``dense_tables``; ``n`` entities), whatever method built the table:

- ``weight``: ``weight[i]`` (a plain table);
- ``U``: ``U[i mod m]`` (hashing trick; with ``w``: MEmCom);
- ``Q``, ``R``: ``Q[i // p] * R[i mod p]`` (quotient-remainder; with ``w``: memcom_qr);
- ``w``: the above times ``w[i]``;
- ``U``, ``rows``, ``w``: ``sum_j w[i, j] * U[rows[i, j]]`` (the MEmCom-family
  variants: a second hash, or a stored assignment), ``rows`` kept in the program
  as int16 (int32 when ``m`` > 32,767).

Scorers (what turns the query ``q`` into a score per item):

- ``linear``: the classifier's output layer (one uncompressed row per item);
- ``tied`` / ``dot``: ``<q, e_i>`` (+ ``b_i``) with ``e_i`` from the compressed item
  table. For ``U`` layouts it is computed as ``w_i * (q U^T)[i mod m]``:
  ``O(m*d + n)`` per request, not ``O(n*d)``;
- ``mlp``: RankNet's pair network over ``[q, e_i]``.

Storage (``dtype``): ``"fp32"``; ``"int8"`` / ``"int4"`` quantise with torchao's
own configs (``quantize_slim``): every weight matrix, embedding tables (``U``,
``Q``, ``R``, plain tables) and linear layers alike, weight-only and asymmetric,
int8 with one scale per row, int4 with one scale per 32 columns where the width
allows (per row otherwise), which ExecuTorch runs with its
``quantized_decomposed::embedding_byte`` / ``embedding_4bit`` kernels; per-entity
scalars (MEmCom's ``w``, the item biases) float16. Activations stay float, so a
``.pte`` equals its eager twin to float rounding.

Invalid input:

- eager (``model(...)`` in Python): ``ValueError`` naming the feature, e.g.
  ``feature 'history': id 1703 is out of range for table 'item' (num_embeddings=1682)``;
- exported programs: there is no exception to raise inside a graph, so every
  lookup index of an invalid id is replaced by the table's row count, which the
  bounds check of the ``embedding`` kernel (and of the quantised embedding
  kernels) rejects; inconsistent lengths make ``scatter_add``/``index_put`` go
  out of bounds the same way. ExecuTorch then fails the call (the Python
  binding raises ``RuntimeError``; the log names the kernel), and the
  ``torch.export`` program raises from the same op. Nothing is clamped: a bad
  id never yields a wrong score silently.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from memcom_torchrec.models.layers import HISTORY_FEATURE, USER_FEATURE
from memcom_torchrec.modules.dense_tables import dense_tables, table_layout
from memcom_torchrec.modules.quant_grid import DTYPES, FP32, INT4, INT8, is_grouped, weight_only_config

# The table layouts a slim lookup computes: sorted tensor roles (see the module docstring).
LAYOUTS = (("weight",), ("U",), ("U", "w"), ("Q", "R"), ("Q", "R", "w"), ("U", "rows", "w"))


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


def half_buffer(module: nn.Module, name: str) -> None:
    """Stores ``module``'s buffer ``name`` as float16 (raises if a value exceeds float16's range)."""
    t = getattr(module, name)
    if t.abs().max().item() > 65000.0:
        raise ValueError(f"{type(module).__name__}.{name} exceeds float16's range; keep dtype='fp32'")
    setattr(module, name, t.half())


# ---------------------------------------------------------------------------
# Lookups: ids -> per-id embeddings
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class TableInfo:
    """What a slim lookup needs to know about its table.

    Args:
        name (str): table name (for error messages).
        roles (Tuple[str, ...]): its tensors' roles, one of ``LAYOUTS``.
        num_embeddings (int): valid ids are ``[0, num_embeddings)``.
        embedding_dim (int): ``d``.
        mean_pooling (bool): divide bag sums by their lengths.
        num_buckets (int): ``m`` (MEmCom, hashing) or ``p`` (QR, MEmCom-QR); 0 for plain.
    """

    name: str
    roles: Tuple[str, ...]
    num_embeddings: int
    embedding_dim: int
    mean_pooling: bool
    num_buckets: int = 0


class SlimLookup(nn.Module):
    """Per-id embeddings of one table with core ATen ops.

    Args:
        info (TableInfo): the table.
        tables (Dict[str, torch.Tensor]): tensors by role: ``weight``
            (plain), ``U`` and optionally ``w`` (MEmCom / hashing), ``Q`` and
            ``R`` (QR), ``Q``, ``R`` and ``w`` (MEmCom-QR), ``U``, integer ``rows``
            and ``w`` (``n x k`` each; the MEmCom-family variants).
    """

    def __init__(self, info: TableInfo, tables: Dict[str, torch.Tensor]) -> None:
        super().__init__()
        if info.roles not in LAYOUTS:
            raise ValueError(
                f"table '{info.name}': no slim lookup for tensors {list(info.roles)}, expected one of "
                f"{[list(r) for r in LAYOUTS]}"
            )
        self.info = info
        missing = [k for k in info.roles if k not in tables]
        if missing:
            raise ValueError(f"table '{info.name}' ({'+'.join(info.roles)}) lacks tensor(s) {missing}")
        n, d, m = info.num_embeddings, info.embedding_dim, info.num_buckets
        hashes = int(tables["rows"].shape[1]) if "rows" in info.roles and tables["rows"].dim() == 2 else 1
        expected = {
            "weight": (n, d),
            "U": (m, d),
            "w": (n, hashes) if "rows" in info.roles else (n,),
            "Q": (-(-n // m) if m else 0, d),
            "R": (m, d),
            "rows": (n, hashes),
        }
        for k in info.roles:
            if tuple(tables[k].shape) != expected[k]:
                raise ValueError(
                    f"table '{info.name}' ({'+'.join(info.roles)}): tensor {k} has shape {tuple(tables[k].shape)}, "
                    f"expected {expected[k]}"
                )
        if "Q" in info.roles:
            self.quotient = RowTable(tables["Q"])
            self.remainder = RowTable(tables["R"])
        else:
            self.rows = RowTable(tables["weight" if "weight" in info.roles else "U"])
        if "w" in info.roles:
            self.entity_weights = ScalarTable(tables["w"])
        self.num_hashes = hashes
        if "rows" in info.roles:
            # entity -> rows of U, as small as m allows (int16 up to 32,767 rows)
            dtype = torch.int16 if m <= (1 << 15) - 1 else torch.int32
            self.register_buffer("bucket_rows", tables["rows"].to(dtype).reshape(-1).clone().contiguous())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``len(ids) x d`` float32 embeddings; invalid ids make a lookup go out of bounds."""
        n, m, roles = self.info.num_embeddings, self.info.num_buckets, self.info.roles
        valid = (ids >= 0) & (ids < n)
        if "rows" in roles:  # sum_j w[i, j] U[rows[i, j]]; the poisoned index n*k fails every lookup
            k = self.num_hashes
            slots = (torch.where(valid, ids, n).unsqueeze(1) * k + torch.arange(k)).reshape(-1)
            inside = slots < n * k
            parts = self.rows(self.bucket_rows.index_select(0, torch.where(inside, slots, 0)).long()
                              + torch.where(inside, 0, m))
            return (self.entity_weights(slots) * parts).view(-1, k, self.info.embedding_dim).sum(1)
        if "weight" in roles:
            v = self.rows(torch.where(valid, ids, n))
        elif "U" in roles:
            v = self.rows(torch.where(valid, torch.remainder(ids, m), m))
        else:
            quotient_rows = -(-n // m)
            q = self.quotient(torch.where(valid, torch.div(ids, m, rounding_mode="floor"), quotient_rows))
            v = q * self.remainder(torch.remainder(ids, m))
        if "w" in roles:  # w has exactly n rows: the poisoned index n fails its lookup
            v = self.entity_weights(torch.where(valid, ids, n)) * v
        return v

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
        """Every entity's vector, ``n x d`` (what ``self(arange(n))`` computes)."""
        return self(torch.arange(self.info.num_embeddings))

    def catalogue_scores(self, q: torch.Tensor) -> torch.Tensor:
        """``<q_b, e_i>`` for every row ``b`` and entity ``i``: ``B x n``.

        ``U`` layouts score the ``m`` shared rows once and gather: ``w_i * (q U^T)[i mod m]``.
        """
        n, m = self.info.num_embeddings, self.info.num_buckets
        if "U" not in self.info.roles:
            return nn.functional.linear(q, self.catalogue())
        if "rows" in self.info.roles:  # sum_j w[i, j] (q U^T)[rows[i, j]]
            per_row = nn.functional.linear(q, self.rows.all_rows())
            parts = per_row.index_select(1, self.bucket_rows.long()) * self.entity_weights.column()
            return parts.view(q.shape[0], n, self.num_hashes).sum(2)
        scores = nn.functional.linear(q, self.rows.all_rows()).index_select(1, torch.remainder(torch.arange(n), m))
        return scores * self.entity_weights.column() if "w" in self.info.roles else scores
def segment_sum(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Sums consecutive rows of ``values`` into ``len(lengths)`` bags (empty bags: 0).

    Finds each row's bag with ``cumsum`` + ``scatter_add`` (no ``repeat_interleave``
    with a data-dependent size) and accumulates with ``index_put``. Lengths that do
    not add up to ``len(values)`` (or are negative) make an index go out of bounds.

    Args:
        values (torch.Tensor): ``N x d``.
        lengths (torch.Tensor): ``B`` int64 bag lengths, ``sum(lengths) == N``.

    Returns:
        torch.Tensor: ``B x d``.
    """
    n, b = values.shape[0], lengths.shape[0]
    ends = torch.where(lengths >= 0, torch.cumsum(lengths, 0), n + 1)
    marks = torch.zeros(n + 1, dtype=lengths.dtype).scatter_add(0, ends, torch.ones_like(ends))
    bag = torch.cumsum(marks, 0)[:n]  # bag of row j: bags ending at or before j
    out = torch.zeros(b, values.shape[1], dtype=values.dtype)
    return out.index_put((bag,), values, accumulate=True)


# ---------------------------------------------------------------------------
# Scorers: query -> a score per item
# ---------------------------------------------------------------------------
class LinearScorer(nn.Module):
    """The classifier's output layer: ``q @ O^T + b`` (one uncompressed row per item)."""

    def __init__(self, output: nn.Linear) -> None:
        super().__init__()
        self.output = output

    def forward(self, q: torch.Tensor, items: SlimLookup) -> torch.Tensor:
        return self.output(q)


class DotScorer(nn.Module):
    """``<q, e_i>`` (+ ``b_i``) with ``e_i`` from the item table (``SlimLookup.catalogue_scores``).

    Args:
        bias (Optional[torch.Tensor]): ``n`` item biases (the ``tied`` scorer), or None (RankNet's ``dot``).
    """

    def __init__(self, bias: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        self.item_bias = ScalarTable(bias) if bias is not None else None

    def forward(self, q: torch.Tensor, items: SlimLookup) -> torch.Tensor:
        scores = items.catalogue_scores(q)
        return scores + self.item_bias.column() if self.item_bias is not None else scores


class PairMLPScorer(nn.Module):
    """RankNet's ``mlp`` scorer over ``[q, e_i]`` for every item (``models.ranknet.PairScorer``)."""

    def __init__(self, pair_scorer: nn.Module) -> None:
        super().__init__()
        self.pair_scorer = pair_scorer

    def forward(self, q: torch.Tensor, items: SlimLookup) -> torch.Tensor:
        return self.pair_scorer(q, items.catalogue())


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------
class SlimModel(nn.Module):
    """A trained next-item classifier or RankNet without TorchRec: plain tensors in, scores out.

    Args:
        history (SlimLookup): lookup of the ``history`` feature (a bag per row); also
            the item table the scorer reads.
        user (Optional[SlimLookup]): lookup of the ``user_id`` feature (one id per
            row), or None for a phone-shaped model (no user table, no user input).
        query (nn.Module): pooled features -> the query (the MLP, and the projection
            to ``d`` where the scorer needs one).
        scorer (nn.Module): ``LinearScorer``, ``DotScorer`` or ``PairMLPScorer``.
        kind (str): what it was built from, e.g. ``next_item/tied`` (for reports).

    Example::

        slim = build_slim_model(trained.model)
        scores = slim(history_ids, history_lengths)            # phone-shaped: B x num_items
        scores = slim(history_ids, history_lengths, user_ids)  # with a user table
    """

    def __init__(
        self, history: SlimLookup, user: Optional[SlimLookup], query: nn.Module, scorer: nn.Module, kind: str = ""
    ) -> None:
        super().__init__()
        self.history = history
        self.user = user
        self.query = query
        self.scorer = scorer
        self.kind = kind
        self.dtype = FP32  # set by quantize_slim

    @property
    def num_items(self) -> int:
        return self.history.info.num_embeddings

    @property
    def input_names(self) -> List[str]:
        return ["history_ids", "history_lengths"] + (["user_ids"] if self.user is not None else [])

    def forward(
        self, history_ids: torch.Tensor, history_lengths: torch.Tensor, user_ids: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Scores every item for each request.

        Args:
            history_ids (torch.Tensor): ``N`` int64 item ids, the histories of all
                rows back to back.
            history_lengths (torch.Tensor): ``B`` int64 history lengths (0 allowed).
            user_ids (Optional[torch.Tensor]): ``B`` int64 user ids (only if the model has a user table).

        Returns:
            torch.Tensor: ``B x num_items`` float32 scores.

        Raises:
            ValueError: (eager only) ids out of range, inconsistent lengths, bad dtypes, a missing
                or unexpected ``user_ids``.
        """
        if not torch.compiler.is_compiling():
            self.check_inputs(history_ids, history_lengths, user_ids)
        hist = segment_sum(self.history(history_ids), history_lengths)
        if self.history.info.mean_pooling:
            hist = hist / torch.where(history_lengths > 0, history_lengths, 1).unsqueeze(1).to(hist.dtype)
        x = hist if self.user is None else torch.cat([hist, self.user(user_ids)], dim=1)
        return self.scorer(self.query(x), self.history)

    def check_inputs(
        self, history_ids: torch.Tensor, history_lengths: torch.Tensor, user_ids: Optional[torch.Tensor] = None
    ) -> None:
        """Raises ``ValueError`` describing the first problem with the inputs."""
        self.history.check_ids(HISTORY_FEATURE, history_ids)
        if (user_ids is None) != (self.user is None):
            raise ValueError(
                f"this model takes {self.input_names}: "
                + ("user_ids are missing" if user_ids is None else "it has no user table, drop user_ids")
            )
        if history_lengths.dim() != 1 or history_lengths.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"feature '{HISTORY_FEATURE}': lengths must be a 1-D int64 tensor, got "
                f"{history_lengths.dtype} of shape {tuple(history_lengths.shape)}"
            )
        if self.user is not None:
            self.user.check_ids(USER_FEATURE, user_ids)
            if history_lengths.shape[0] != user_ids.shape[0]:
                raise ValueError(
                    f"batch mismatch: {history_lengths.shape[0]} history lengths but {user_ids.shape[0]} user ids"
                )
        if history_lengths.numel() and int(history_lengths.min()) < 0:
            raise ValueError(f"feature '{HISTORY_FEATURE}': negative length {int(history_lengths.min())}")
        total = int(history_lengths.sum()) if history_lengths.numel() else 0
        if total != history_ids.shape[0]:
            raise ValueError(
                f"feature '{HISTORY_FEATURE}': lengths add up to {total} but {history_ids.shape[0]} ids were given"
            )


# ---------------------------------------------------------------------------
# From a trained model
# ---------------------------------------------------------------------------
def lookup_for_feature(collection: nn.Module, feature: str) -> SlimLookup:
    """The slim lookup of the table that feeds ``feature``."""
    configs = collection.embedding_bag_configs()
    config = next((t for t in configs if feature in (t.feature_names or [t.name])), None)
    if config is None:
        have = sorted(f for t in configs for f in (t.feature_names or [t.name]))
        raise ValueError(f"no table feeds feature '{feature}' (the collection has features {have})")
    tensors = dense_tables(collection, config.name)
    roles, buckets = table_layout(tensors)
    for k, t in tensors.items():
        if t.device.type == "meta":
            raise ValueError(f"table '{config.name}' is on the meta device: load a checkpoint into it first")
    pooling = getattr(config.pooling, "name", str(config.pooling))
    info = TableInfo(
        name=config.name,
        roles=roles,
        num_embeddings=config.num_embeddings,
        embedding_dim=config.embedding_dim,
        mean_pooling=pooling == "MEAN",
        num_buckets=buckets,
    )
    return SlimLookup(info, {k: v.detach().cpu() for k, v in tensors.items()})


def _dense_copy(*modules: nn.Module) -> nn.Module:
    """A float32 CPU copy of ``modules`` in sequence, without dropout (inference)."""
    import copy

    layers = [
        m
        for module in modules
        for m in (module if isinstance(module, nn.Sequential) else [module])
        if not isinstance(m, nn.Dropout)
    ]
    out = copy.deepcopy(nn.Sequential(*layers))
    return out.float().cpu().eval().requires_grad_(False)


def build_slim_model(model: nn.Module, dtype: str = FP32) -> SlimModel:
    """Copies a trained next-item classifier or RankNet into a ``SlimModel``.

    Args:
        model (nn.Module): an unsharded ``NextItemClassifier`` or ``RankNet`` (or the
            ``...Train`` module wrapping it) whose tables are materialised.
        dtype (str): ``fp32``, ``int8`` or ``int4`` (see ``quantize_slim``).

    Returns:
        SlimModel: in eval mode, sharing no storage with ``model``.

    Raises:
        ValueError: unknown dtype or model, a feature without a table, tables on meta.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype '{dtype}'; choose one of {list(DTYPES)}")
    inner = getattr(model, "model", model)
    scorer_name = getattr(inner, "scorer", None)
    features = list(getattr(inner, "features", []))
    if scorer_name is None or features not in ([HISTORY_FEATURE], [HISTORY_FEATURE, USER_FEATURE]):
        raise ValueError(f"{type(inner).__name__} is not a NextItemClassifier or RankNet of this package")
    history = lookup_for_feature(inner.embeddings, HISTORY_FEATURE)
    user = lookup_for_feature(inner.embeddings, USER_FEATURE) if USER_FEATURE in features else None
    if scorer_name == "linear":
        query, scorer = _dense_copy(inner.mlp), LinearScorer(_dense_copy(inner.output)[0])
    elif scorer_name == "tied":
        query, scorer = _dense_copy(inner.mlp, inner.head), DotScorer(inner.item_bias.detach().cpu())
    elif scorer_name == "dot":
        query, scorer = _dense_copy(inner.query), DotScorer()
    elif scorer_name == "mlp":
        query, scorer = _dense_copy(inner.query), PairMLPScorer(_dense_copy(inner.pair_scorer)[0])
    else:
        raise ValueError(f"no slim scorer for '{scorer_name}'")
    model_kind = "ranknet" if hasattr(inner, "query") else "next_item"
    slim = SlimModel(history, user, query, scorer, kind=f"{model_kind}/{scorer_name}").eval()
    return quantize_slim(slim, dtype)


class DequantLinear(nn.Module):
    """A linear layer whose weight is stored as an ``out x in`` table (``nn.Embedding``) for torchao.

    ``forward`` reads the whole table through the embedding kernel (for a
    quantised table: ``embedding_byte`` / ``embedding_4bit``, which dequantise
    exactly as torchao's eager tensor does) and applies ``linear``.

    Args:
        linear (nn.Linear): the float layer.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight_rows = RowTable(linear.weight)
        if linear.bias is not None:
            self.register_buffer("bias", linear.bias.detach().float().clone())
        else:
            self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight_rows.all_rows(), self.bias)


def _swap_linears(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, DequantLinear(child))
        else:
            _swap_linears(child)


def quantize_slim(slim: SlimModel, dtype: str) -> SlimModel:
    """Quantises a float slim model in place with torchao (see the module docstring); returns it.

    Every weight matrix, embedding tables and linear layers alike, becomes an
    ``nn.Embedding`` quantised by torchao's ``IntxWeightOnlyConfig`` (asymmetric;
    int8 one scale per row, int4 one per 32 columns where the width allows), which
    ExecuTorch lowers to ``quantized_decomposed::embedding_byte`` / ``embedding_4bit``;
    per-entity scalars (``w``, item biases) become float16. The result is the
    program's eager twin: torchao's tensors compute with the dequantised weights,
    so a ``.pte`` lowered from it matches it to float rounding. (Linear layers are
    weight-only too: XNNPACK's dynamically quantised activations round differently
    from torchao's eager reference, 4.8e-3 off on one row of a batch of 37,
    ``benchmarks/RESULTS_export.md``, so such a program has no exact eager twin.)
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype '{dtype}'; choose one of {list(DTYPES)}")
    if dtype == FP32:
        return slim
    from torchao.quantization.quant_api import quantize_

    _swap_linears(slim.query)
    _swap_linears(slim.scorer)
    for grouped in (False, True):
        quantize_(slim, weight_only_config(dtype, grouped), filter_fn=lambda m, fqn, g=grouped: isinstance(
            m, nn.Embedding) and g == is_grouped(dtype, m.embedding_dim))
    for module in slim.modules():
        if isinstance(module, ScalarTable):
            half_buffer(module, "weight")
    slim.dtype = dtype
    return slim


# ---------------------------------------------------------------------------
# Sizes and inputs
# ---------------------------------------------------------------------------
def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor stores; a torchao quantised tensor counts its packed data, scales and zero points."""
    if hasattr(t, "qdata"):
        bits = {torch.int4: 4, torch.int8: 8}.get(getattr(t, "target_dtype", torch.int8), 8)
        extras = [getattr(t, a) for a in ("scale", "zero_point") if getattr(t, a, None) is not None]
        return t.qdata.numel() * bits // 8 + sum(e.numel() * e.element_size() for e in extras)
    return t.numel() * t.element_size()


def state_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer of a module (what a program stores)."""
    return sum(tensor_bytes(t) for t in list(module.parameters()) + list(module.buffers()))


def embedding_bytes(slim: SlimModel) -> int:
    """Bytes of the slim model's embedding tables (history + user lookups, ``w`` included)."""
    return state_bytes(slim.history) + (state_bytes(slim.user) if slim.user is not None else 0)


def dense_bytes(slim: SlimModel) -> int:
    """Bytes of the linear layers and item biases (query network + scorer)."""
    return state_bytes(slim.query) + state_bytes(slim.scorer)


def kjt_to_inputs(features, with_user: bool = True) -> Tuple[torch.Tensor, ...]:  # pyre-ignore
    """``(history_ids, history_lengths[, user_ids])`` of a next-item KeyedJaggedTensor.

    Raises:
        ValueError: a row with other than one user id, or no ``user_id`` feature where one is wanted.
    """
    d = features.to_dict()
    hist = d[HISTORY_FEATURE]
    if not with_user:
        return hist.values().long(), hist.lengths().long()
    if USER_FEATURE not in d:
        raise ValueError(f"the model takes a '{USER_FEATURE}' feature; the batch has {sorted(d)}")
    user = d[USER_FEATURE]
    if user.lengths().numel() and not bool((user.lengths() == 1).all()):
        raise ValueError(f"feature '{USER_FEATURE}': the slim model takes exactly one id per row")
    return hist.values().long(), hist.lengths().long(), user.values().long()


def example_inputs(slim: SlimModel, batch: int = 3, seed: int = 0) -> Tuple[torch.Tensor, ...]:
    """Valid random inputs (with an empty history) for tracing and tests."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 6, (batch,), generator=g)
    lengths[0] = 0
    if batch > 1:
        lengths[1] = max(int(lengths[1]), 2)
    ids = torch.randint(0, slim.history.info.num_embeddings, (int(lengths.sum()),), generator=g)
    if slim.user is None:
        return ids, lengths
    users = torch.randint(0, slim.user.info.num_embeddings, (batch,), generator=g)
    return ids, lengths, users
