"""Slim single-device next-item models: plain tensors in, logits out, core ATen ops only.

A trained ``NextItemClassifier`` holds TorchRec/FBGEMM collections that a phone
runtime cannot run (``aten::_embedding_bag`` and FBGEMM ops have no ExecuTorch
kernels). ``build_slim_model`` copies its tables into small lookup modules that
use only ``embedding`` (a bounds-checked gather), element-wise ops and a segment
sum (``cumsum`` + ``scatter_add`` to find each id's bag, ``index_put`` with
``accumulate=True`` to sum it), then the MLP and the output layer.

Per-id embeddings by the roles of a table's tensors, as each collection hands
them over (``dense_tables``; ``n`` entities), whatever method built the table:

- ``weight``: ``weight[i]`` (a plain table);
- ``U``: ``U[i mod m]`` (hashing trick; with ``w``: MEmCom);
- ``Q``, ``R``: ``Q[i // p] * R[i mod p]`` (quotient-remainder; with ``w``: memcom_qr);
- ``w``: the above times ``w[i]``.

Storage (``dtype``): ``"fp32"`` keeps every table in float32; ``"compact"``
stores every embedding table (``U``, ``Q``, ``R`` and plain tables) as uint8
rows with a float16 scale and bias per row, dequantised in the graph
(``q * scale + bias``), and MEmCom's ``w`` as float16. The MLP and the output
layer stay float32.

Invalid input:

- eager (``model(...)`` in Python): ``ValueError`` naming the feature, e.g.
  ``feature 'history': id 1703 is out of range for table 'item' (num_embeddings=1682)``;
- exported programs: there is no exception to raise inside a graph, so every
  lookup index of an invalid id is replaced by the table's row count, which the
  bounds check of the ``embedding`` kernel rejects; inconsistent lengths make
  ``scatter_add``/``index_put`` go out of bounds the same way. ExecuTorch then
  fails the call (``Method.execute`` returns ``InvalidArgument``, 0x12; the
  Python binding raises ``RuntimeError``; the log names the kernel, e.g.
  ``op_embedding.cpp: Check failed (indices_ptr[i] < weight_height)``), and the
  ``torch.export`` program raises ``IndexError``/``RuntimeError`` from the same
  op. Nothing is clamped: a bad id never yields a wrong score silently.
"""

from dataclasses import dataclass
from typing import Dict, Tuple

import torch
from torch import nn

from memcom_torchrec.modules.dense_tables import dense_tables, table_layout

FP32, COMPACT = "fp32", "compact"
DTYPES = (FP32, COMPACT)
HISTORY_FEATURE, USER_FEATURE = "history", "user_id"

# The table layouts a slim lookup computes: sorted tensor roles (see the module docstring).
LAYOUTS = (("weight",), ("U",), ("U", "w"), ("Q", "R"), ("Q", "R", "w"))


# ---------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------
def quantize_rows(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row-wise asymmetric uint8 quantisation with float16 scale and bias.

    Row ``r`` is stored as ``q[r] (uint8)`` with ``x ~= q * scale[r] + bias[r]``;
    ``scale = (max - min) / 255`` and ``bias = min`` are rounded to float16
    first, and ``q`` is computed against the rounded values.

    Args:
        weight (torch.Tensor): ``rows x d`` float table.

    Returns:
        Tuple[torch.Tensor, torch.Tensor]: ``q`` (``rows x d`` uint8) and
        ``scale_bias`` (``rows x 2`` float16: column 0 scale, column 1 bias).

    Raises:
        ValueError: a value is not finite or exceeds float16's range.
    """
    w = weight.detach().float()
    if not torch.isfinite(w).all():
        raise ValueError("cannot quantise a table with non-finite values")
    lo, hi = w.min(dim=1).values, w.max(dim=1).values
    if max(lo.abs().max().item(), hi.abs().max().item()) > 65000.0:
        raise ValueError("table values exceed float16's range; keep dtype='fp32'")
    scale = ((hi - lo) / 255.0).half()
    bias = lo.half()
    s, b = scale.float(), bias.float()
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round((w - b[:, None]) / safe[:, None]).clamp(0, 255)
    q = torch.where(s[:, None] > 0, q, torch.zeros_like(q)).to(torch.uint8)
    return q, torch.stack([scale, bias], dim=1)


def dequantize_rows(q: torch.Tensor, scale_bias: torch.Tensor) -> torch.Tensor:
    """Float32 table of ``quantize_rows``' output (the same arithmetic as the graph)."""
    sb = scale_bias.float()
    return q.float() * sb[:, :1] + sb[:, 1:]


class RowTable(nn.Module):
    """A ``rows x d`` embedding table, float32 or uint8 with per-row float16 scale/bias.

    Args:
        weight (torch.Tensor): the float table.
        compact (bool): store it quantised (``quantize_rows``).
    """

    def __init__(self, weight: torch.Tensor, compact: bool = False) -> None:
        super().__init__()
        self.compact = compact
        self.num_rows, self.dim = int(weight.shape[0]), int(weight.shape[1])
        if compact:
            q, sb = quantize_rows(weight)
            self.register_buffer("q", q)
            self.register_buffer("scale_bias", sb)
        else:
            self.register_buffer("weight", weight.detach().float().clone().contiguous())

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` as float32 (``len(idx) x d``); an index outside ``[0, rows)`` fails."""
        if not self.compact:
            return nn.functional.embedding(idx, self.weight)
        sb = nn.functional.embedding(idx, self.scale_bias).float()
        return nn.functional.embedding(idx, self.q).float() * sb[:, :1] + sb[:, 1:]

    def dequantized(self) -> torch.Tensor:
        """The float32 table this module computes with."""
        return dequantize_rows(self.q, self.scale_bias) if self.compact else self.weight


class ScalarTable(nn.Module):
    """One scalar per entity (MEmCom's ``w``), float32 or float16, as an ``n x 1`` table.

    Args:
        values (torch.Tensor): ``n`` values.
        compact (bool): store float16.
    """

    def __init__(self, values: torch.Tensor, compact: bool = False) -> None:
        super().__init__()
        self.compact = compact
        v = values.detach().float().reshape(-1, 1)
        if compact and v.abs().max().item() > 65000.0:
            raise ValueError("entity weights exceed float16's range; keep dtype='fp32'")
        self.register_buffer("weight", (v.half() if compact else v).clone().contiguous())

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """``len(idx) x 1`` float32 values; an index outside ``[0, n)`` fails."""
        return nn.functional.embedding(idx, self.weight).float()

    def dequantized(self) -> torch.Tensor:
        return self.weight.float().reshape(-1)


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
        tables (Dict[str, torch.Tensor]): float tensors by role: ``weight``
            (plain), ``U`` and optionally ``w`` (MEmCom / hashing), ``Q`` and
            ``R`` (QR), ``Q``, ``R`` and ``w`` (MEmCom-QR).
        compact (bool): store tables quantised (see ``RowTable``/``ScalarTable``).
    """

    def __init__(self, info: TableInfo, tables: Dict[str, torch.Tensor], compact: bool = False) -> None:
        super().__init__()
        if info.roles not in LAYOUTS:
            raise ValueError(
                f"table '{info.name}': no slim lookup for tensors {list(info.roles)}, expected one of "
                f"{[list(r) for r in LAYOUTS]}"
            )
        self.info = info
        self.compact = compact
        missing = [k for k in info.roles if k not in tables]
        if missing:
            raise ValueError(f"table '{info.name}' ({'+'.join(info.roles)}) lacks tensor(s) {missing}")
        n, d, m = info.num_embeddings, info.embedding_dim, info.num_buckets
        expected = {
            "weight": (n, d),
            "U": (m, d),
            "w": (n,),
            "Q": (-(-n // m) if m else 0, d),
            "R": (m, d),
        }
        for k in info.roles:
            if tuple(tables[k].shape) != expected[k]:
                raise ValueError(
                    f"table '{info.name}' ({'+'.join(info.roles)}): tensor {k} has shape {tuple(tables[k].shape)}, "
                    f"expected {expected[k]}"
                )
        if "Q" in info.roles:
            self.quotient = RowTable(tables["Q"], compact)
            self.remainder = RowTable(tables["R"], compact)
        else:
            self.rows = RowTable(tables["weight" if "weight" in info.roles else "U"], compact)
        if "w" in info.roles:
            self.entity_weights = ScalarTable(tables["w"], compact)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``len(ids) x d`` float32 embeddings; invalid ids make a lookup go out of bounds."""
        n, m, roles = self.info.num_embeddings, self.info.num_buckets, self.info.roles
        valid = (ids >= 0) & (ids < n)
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

    def dequantized_tables(self) -> Dict[str, torch.Tensor]:
        """The float32 tensors this lookup computes with, by role (input of a float twin)."""
        out = {"Q": self.quotient.dequantized(), "R": self.remainder.dequantized()} if "Q" in self.info.roles else {
            self.info.roles[0]: self.rows.dequantized()}
        if "w" in self.info.roles:
            out["w"] = self.entity_weights.dequantized()
        return out


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
# The model
# ---------------------------------------------------------------------------
class SlimNextItemModel(nn.Module):
    """``NextItemClassifier`` without TorchRec: plain tensors in, logits out.

    Args:
        history (SlimLookup): lookup of the ``history`` feature (a bag per row).
        user (SlimLookup): lookup of the ``user_id`` feature (one id per row).
        mlp (nn.Module): the classifier's MLP (copied, eval mode).
        output (nn.Module): the classifier's output layer.

    Example::

        slim = build_slim_model(trained.model)
        logits = slim(history_ids, history_lengths, user_ids)  # B x num_items
    """

    def __init__(self, history: SlimLookup, user: SlimLookup, mlp: nn.Module, output: nn.Module) -> None:
        super().__init__()
        self.history = history
        self.user = user
        self.mlp = mlp
        self.output = output

    @property
    def num_items(self) -> int:
        return int(self.output.out_features)

    def forward(
        self, history_ids: torch.Tensor, history_lengths: torch.Tensor, user_ids: torch.Tensor
    ) -> torch.Tensor:
        """Scores every item for each request.

        Args:
            history_ids (torch.Tensor): ``N`` int64 item ids, the histories of all
                rows back to back.
            history_lengths (torch.Tensor): ``B`` int64 history lengths (0 allowed).
            user_ids (torch.Tensor): ``B`` int64 user ids, one per row.

        Returns:
            torch.Tensor: ``B x num_items`` float32 logits.

        Raises:
            ValueError: (eager only) ids out of range, inconsistent lengths, bad dtypes.
        """
        if not torch.compiler.is_compiling():
            self.check_inputs(history_ids, history_lengths, user_ids)
        hist = segment_sum(self.history(history_ids), history_lengths)
        if self.history.info.mean_pooling:
            hist = hist / torch.where(history_lengths > 0, history_lengths, 1).unsqueeze(1).to(hist.dtype)
        user = self.user(user_ids)
        return self.output(self.mlp(torch.cat([hist, user], dim=1)))

    def check_inputs(
        self, history_ids: torch.Tensor, history_lengths: torch.Tensor, user_ids: torch.Tensor
    ) -> None:
        """Raises ``ValueError`` describing the first problem with the inputs."""
        self.history.check_ids(HISTORY_FEATURE, history_ids)
        self.user.check_ids(USER_FEATURE, user_ids)
        if history_lengths.dim() != 1 or history_lengths.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"feature '{HISTORY_FEATURE}': lengths must be a 1-D int64 tensor, got "
                f"{history_lengths.dtype} of shape {tuple(history_lengths.shape)}"
            )
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
# From a trained collection
# ---------------------------------------------------------------------------
def lookup_for_feature(collection: nn.Module, feature: str, compact: bool) -> SlimLookup:
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
    return SlimLookup(info, {k: v.detach().cpu() for k, v in tensors.items()}, compact)


def _dense_copy(module: nn.Module) -> nn.Module:
    """A float32 CPU copy without dropout (inference)."""
    layers = [m for m in (module if isinstance(module, nn.Sequential) else [module]) if not isinstance(m, nn.Dropout)]
    import copy

    out = copy.deepcopy(nn.Sequential(*layers) if isinstance(module, nn.Sequential) else layers[0])
    return out.float().cpu().eval().requires_grad_(False)


def build_slim_model(model: nn.Module, dtype: str = FP32) -> SlimNextItemModel:
    """Copies a trained next-item model into a ``SlimNextItemModel``.

    Args:
        model (nn.Module): an unsharded ``NextItemClassifier`` (or the
            ``NextItemTrain`` wrapping it) whose tables are materialised.
        dtype (str): ``"fp32"`` or ``"compact"`` (uint8 rows + float16 scale/bias,
            float16 ``w``).

    Returns:
        SlimNextItemModel: in eval mode, sharing no storage with ``model``.

    Raises:
        ValueError: unknown dtype, a feature without a table, tables on meta.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype '{dtype}'; choose one of {list(DTYPES)}")
    inner = getattr(model, "model", model)
    for attr in ("embeddings", "mlp", "output"):
        if not hasattr(inner, attr):
            raise ValueError(f"{type(inner).__name__} is not a NextItemClassifier (no '{attr}')")
    if list(getattr(inner, "features", [HISTORY_FEATURE, USER_FEATURE])) != [HISTORY_FEATURE, USER_FEATURE]:
        raise ValueError(f"expected features {[HISTORY_FEATURE, USER_FEATURE]}, got {inner.features}")
    compact = dtype == COMPACT
    slim = SlimNextItemModel(
        history=lookup_for_feature(inner.embeddings, HISTORY_FEATURE, compact),
        user=lookup_for_feature(inner.embeddings, USER_FEATURE, compact),
        mlp=_dense_copy(inner.mlp),
        output=_dense_copy(inner.output),
    )
    return slim.eval()


def dequantized_twin(slim: SlimNextItemModel) -> SlimNextItemModel:
    """The float32 slim model holding the tables a compact model computes with.

    A compact model and its twin compute the same function (up to float
    rounding); the twin of a float32 model is a copy of it.
    """
    import copy

    def twin(lookup: SlimLookup) -> SlimLookup:
        return SlimLookup(lookup.info, {k: v.clone() for k, v in lookup.dequantized_tables().items()}, False)

    return SlimNextItemModel(twin(slim.history), twin(slim.user), copy.deepcopy(slim.mlp), copy.deepcopy(slim.output)).eval()


def state_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer of a module (what a program stores)."""
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def embedding_bytes(slim: SlimNextItemModel) -> int:
    """Bytes of the slim model's embedding tables (history + user lookups)."""
    return state_bytes(slim.history) + state_bytes(slim.user)


def kjt_to_inputs(features) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # pyre-ignore
    """``(history_ids, history_lengths, user_ids)`` of a next-item KeyedJaggedTensor.

    Raises:
        ValueError: a row with other than one user id.
    """
    d = features.to_dict()
    hist, user = d[HISTORY_FEATURE], d[USER_FEATURE]
    if user.lengths().numel() and not bool((user.lengths() == 1).all()):
        raise ValueError(f"feature '{USER_FEATURE}': the slim model takes exactly one id per row")
    return hist.values().long(), hist.lengths().long(), user.values().long()


def example_inputs(slim: SlimNextItemModel, batch: int = 3, seed: int = 0) -> Tuple[torch.Tensor, ...]:
    """Valid random inputs (with an empty history) for tracing and tests."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 6, (batch,), generator=g)
    lengths[0] = 0
    if batch > 1:
        lengths[1] = max(int(lengths[1]), 2)
    ids = torch.randint(0, slim.history.info.num_embeddings, (int(lengths.sum()),), generator=g)
    users = torch.randint(0, slim.user.info.num_embeddings, (batch,), generator=g)
    return ids, lengths, users
