"""Slim single-device recommenders: plain tensors in, a score per item out, core ATen ops only.

A trained model holds TorchRec/FBGEMM collections that a phone runtime cannot
run (``aten::_embedding_bag`` and FBGEMM ops have no ExecuTorch kernels).
``build_slim_model`` copies its tables into small lookup modules that use only
``embedding`` (a bounds-checked gather), element-wise ops and a segment sum
(``cumsum`` + ``scatter_add`` to find each id's bag, ``index_put`` with
``accumulate=True`` to sum it), then the query network and the scorer.

The pieces, one file each:

- ``export.lookups``: ids -> per-id embeddings, one lookup per storage layout of a
  table's tensors (``weight``; ``U``(+``w``); ``Q``, ``R``(+``w``); ``U``, ``rows``, ``w``;
  ``A``, ``P``; ``head``, ``tail``, ``P``, ``slots``);
- ``export.scorers``: the query -> a score per item (``linear``, ``tied`` / ``dot``,
  ``mlp``), and how each is copied from the trained model (the scorer registry
  ``models.scorers`` names the function);
- ``export.quantize``: fp32 / int8 / int4 / int4_row storage with torchao, and the bytes stored;
- here: ``SlimModel`` (pooling, query, scorer), ``build_slim_model`` and inputs.

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

from typing import List, Optional, Tuple

import torch
from torch import nn

# Besides its own names, this module re-exports the names it held before its pieces moved to
# lookups.py, scorers.py and quantize.py (callers import them from here).
from memcom_torchrec.export.lookups import (
    LAYOUTS,
    HashedLookup,
    MultiRowLookup,
    PlainLookup,
    QRLookup,
    RowTable,
    ScalarTable,
    SlimLookup,
    TableInfo,
    lookup_for_feature,
    make_lookup,
)
from memcom_torchrec.export.quantize import (
    DequantLinear,
    dense_bytes,
    embedding_bytes,
    half_buffer,
    quantize_slim,
    state_bytes,
    tensor_bytes,
)
from memcom_torchrec.export.scorers import DotScorer, LinearScorer, PairMLPScorer
from memcom_torchrec.models.layers import HISTORY_FEATURE, USER_FEATURE
from memcom_torchrec.models.scorers import Scorer, get_scorer
from memcom_torchrec.modules.quant_grid import DTYPES, FP32, INT4, INT8

__all__ = [
    # here
    "SlimModel", "build_slim_model", "example_inputs", "kjt_to_inputs", "segment_sum",
    # lookups.py
    "LAYOUTS", "HashedLookup", "MultiRowLookup", "PlainLookup", "QRLookup", "RowTable", "ScalarTable", "SlimLookup",
    "TableInfo", "lookup_for_feature", "make_lookup",
    # scorers.py
    "DotScorer", "LinearScorer", "PairMLPScorer",
    # quantize.py
    "DequantLinear", "dense_bytes", "embedding_bytes", "half_buffer", "quantize_slim", "state_bytes", "tensor_bytes",
    # modules.quant_grid
    "DTYPES", "FP32", "INT4", "INT8",
]


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
        scorer_spec (Scorer): the trained model's scorer (``models.scorers``); ``kind``
            names it, e.g. ``next_item/tied`` (for reports).

    Example::

        slim = build_slim_model(trained.model)
        scores = slim(history_ids, history_lengths)            # phone-shaped: B x num_items
        scores = slim(history_ids, history_lengths, user_ids)  # with a user table
    """

    def __init__(
        self,
        history: SlimLookup,
        user: Optional[SlimLookup],
        query: nn.Module,
        scorer: nn.Module,
        scorer_spec: Scorer,
    ) -> None:
        super().__init__()
        self.history = history
        self.user = user
        self.query = query
        self.scorer = scorer
        self.scorer_spec = scorer_spec
        self.dtype = FP32  # set by quantize_slim

    @property
    def kind(self) -> str:
        """What it was built from, e.g. ``next_item/tied``."""
        return self.scorer_spec.kind

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
def build_slim_model(model: nn.Module, dtype: str = FP32) -> SlimModel:
    """Copies a trained next-item classifier or RankNet into a ``SlimModel``.

    The model declares its kind (``model_kind``) and its scorer's name (``scorer``);
    the scorer's registry entry (``models.scorers``) names the function that copies
    its query network and scorer (``export.scorers``).

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
    model_kind, scorer_name = getattr(inner, "model_kind", None), getattr(inner, "scorer", None)
    features = list(getattr(inner, "features", []))
    if model_kind is None or scorer_name is None or features not in (
        [HISTORY_FEATURE], [HISTORY_FEATURE, USER_FEATURE]
    ):
        raise ValueError(f"{type(inner).__name__} is not a NextItemClassifier or RankNet of this package")
    spec = get_scorer(model_kind, scorer_name)
    history = lookup_for_feature(inner.embeddings, HISTORY_FEATURE)
    user = lookup_for_feature(inner.embeddings, USER_FEATURE) if USER_FEATURE in features else None
    query, scorer = spec.slim_parts_builder()(inner)
    slim = SlimModel(history, user, query, scorer, spec).eval()
    return quantize_slim(slim, dtype)


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------
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
