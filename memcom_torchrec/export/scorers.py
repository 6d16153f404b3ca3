"""Slim scorers: the query ``q`` -> a score per item, and how each is copied from a trained model.

- ``LinearScorer`` (``linear``): the classifier's output layer (one uncompressed row per item);
- ``DotScorer`` (``tied``, ``dot``): ``<q, e_i>`` (+ ``b_i``) with ``e_i`` from the
  compressed item table (``SlimLookup.catalogue_scores``: for ``U`` layouts
  ``w_i * (q U^T)[i mod m]``, ``O(m*d + n)`` per request, not ``O(n*d)``);
- ``PairMLPScorer`` (``mlp``): RankNet's pair network over ``[q, e_i]``.

Each scorer registered in ``models.scorers`` names its ``*_parts`` function here
(``Scorer.slim_parts``): trained model -> ``(query network, slim scorer)``, float32
copies on CPU without dropout.
"""

import copy
from typing import Optional, Tuple

import torch
from torch import nn

from memcom_torchrec.export.lookups import ScalarTable, SlimLookup


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
# From a trained model (Scorer.slim_parts)
# ---------------------------------------------------------------------------
def dense_copy(*modules: nn.Module) -> nn.Sequential:
    """A float32 CPU copy of ``modules`` in sequence, without dropout (inference)."""
    layers = [
        m
        for module in modules
        for m in (module if isinstance(module, nn.Sequential) else [module])
        if not isinstance(m, nn.Dropout)
    ]
    out = copy.deepcopy(nn.Sequential(*layers))
    return out.float().cpu().eval().requires_grad_(False)


def linear_parts(model: nn.Module) -> Tuple[nn.Module, nn.Module]:
    """``NextItemClassifier`` with the ``linear`` scorer: its MLP, and its output layer."""
    return dense_copy(model.mlp), LinearScorer(dense_copy(model.output)[0])


def tied_parts(model: nn.Module) -> Tuple[nn.Module, nn.Module]:
    """``NextItemClassifier`` with the ``tied`` scorer: its MLP and head, and its item biases."""
    return dense_copy(model.mlp, model.head), DotScorer(model.item_bias.detach().cpu())


def dot_parts(model: nn.Module) -> Tuple[nn.Module, nn.Module]:
    """``RankNet`` with the ``dot`` scorer: its query network, and a dot product without biases."""
    return dense_copy(model.query), DotScorer()


def pair_mlp_parts(model: nn.Module) -> Tuple[nn.Module, nn.Module]:
    """``RankNet`` with the ``mlp`` scorer: its query network, and its pair network."""
    return dense_copy(model.query), PairMLPScorer(dense_copy(model.pair_scorer)[0])
