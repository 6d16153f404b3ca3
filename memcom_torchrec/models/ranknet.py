"""RankNet-style ranking: a (user, item) scorer trained with a pairwise loss against sampled negatives.

The query side pools the user's history (and user id, unless phone-shaped)
and maps it through an MLP to a ``d``-vector ``q``; an item is its (possibly
compressed) embedding ``e_i`` from the same item table the history uses. Two
scorers (registered in ``models.scorers``):

- ``dot``: ``<q, e_i>``. With MEmCom every item of a bucket is ``w_i U[h]``, so
  a dot product orders a bucket's items by ``w_i`` for every user;
- ``mlp``: the paper's ranking setup, a small network over ``[q, e_i]``
  (``Linear(2d, d) -> ReLU -> Linear(d, 1)``), which can order them per user.

Training uses RankNet's pairwise logistic loss ``log(1 + exp(s_neg - s_pos))``
against ``num_negatives`` uniformly sampled items per positive. Full-ranking
evaluation scores every item, so the metric code is the same as for the classifier.
"""

from typing import Sequence, Tuple

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from memcom_torchrec.models.layers import CatalogueModel, mlp, query_features
from memcom_torchrec.models.scorers import DOT, RANKNET, get_scorer


class PairScorer(nn.Module):
    """The ``mlp`` scorer: ``Linear(2d, d) -> ReLU -> Linear(d, 1)`` over ``[q, e]``.

    The first layer is split into its query and item halves, so scoring ``B``
    queries against ``C`` items costs ``(B + C) x d x d`` for the first layer
    plus ``B x C x d`` for the rest, and never builds ``B x C x 2d`` inputs.

    Args:
        embedding_dim (int): ``d``.
    """

    def __init__(self, embedding_dim: int) -> None:
        super().__init__()
        self.query_proj = nn.Linear(embedding_dim, embedding_dim)
        self.item_proj = nn.Linear(embedding_dim, embedding_dim, bias=False)
        self.out = nn.Linear(embedding_dim, 1)

    def forward(self, q: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Scores of ``q`` (``B x d``) against ``items``: ``B x C x d`` (one set per row) or ``C x d`` (shared).

        Returns:
            torch.Tensor: ``B x C``.
        """
        a = self.query_proj(q)  # B x d
        c = self.item_proj(items)
        hidden = torch.relu(a.unsqueeze(1) + (c if c.dim() == 3 else c.unsqueeze(0)))
        return self.out(hidden).squeeze(-1)


class RankNet(CatalogueModel):
    """(query, item) scorer on a shared item table.

    Args:
        embeddings (nn.Module): KJT -> KeyedTensor collection with features
            ``history`` and ``candidate`` in the item table (and ``user_id`` in the user table).
        embedding_dim (int): ``d``.
        num_items (int): catalogue size.
        hidden (Sequence[int]): query MLP widths.
        dropout (float): MLP dropout.
        eval_chunk (int): items embedded at once when scoring the whole catalogue.
        use_user_id (bool): pool the user id into the query.
        scorer (str): a ``ranknet`` scorer, ``dot`` or ``mlp`` (see the module docstring).
        score_chunk (int): items scored at once by the ``mlp`` scorer in full ranking
            (bounds its ``B x chunk x d`` hidden activations).

    Example::

        scores = model(features, candidates)   # B x C
        all_scores = model.score_all(features)  # B x num_items
    """

    model_kind: str = RANKNET

    def __init__(
        self,
        embeddings: nn.Module,
        embedding_dim: int,
        num_items: int,
        hidden: Sequence[int] = (256,),
        dropout: float = 0.0,
        eval_chunk: int = 65536,
        use_user_id: bool = True,
        scorer: str = DOT.name,
        score_chunk: int = 1024,
    ) -> None:
        spec = get_scorer(self.model_kind, scorer)
        super().__init__(embeddings, num_items, query_features(use_user_id), eval_chunk)
        self.scorer = scorer
        self.scorer_spec = spec
        self.score_chunk = score_chunk
        body, out = mlp(embedding_dim * len(self.features), hidden, dropout)
        self.query = nn.Sequential(body, nn.Linear(out, embedding_dim))
        if spec.pair_network:
            self.pair_scorer = PairScorer(embedding_dim)

    def score(self, q: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Scores of queries ``q`` (``B x d``) against ``items`` (``B x C x d``, or ``C x d`` shared): ``B x C``."""
        if not self.scorer_spec.pair_network:  # dot
            return (items * q.unsqueeze(1)).sum(-1) if items.dim() == 3 else q @ items.t()
        if items.dim() == 3:
            return self.pair_scorer(q, items)
        return torch.cat(
            [self.pair_scorer(q, items[s : s + self.score_chunk]) for s in range(0, items.shape[0], self.score_chunk)],
            dim=1,
        )

    def forward(self, features: KeyedJaggedTensor, candidates: torch.Tensor) -> torch.Tensor:
        """Args: features, candidates (``B x C`` item ids). Returns: ``B x C`` scores."""
        x, items = self.lookup(features, candidates)
        return self.score(self.query(x), items)

    def score_all(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Scores of every item: ``B x num_items`` (every rank must call it: see ``lookup_catalogue``)."""
        x, items = self.lookup_catalogue(features)
        return self.score(self.query(x), items)


class RankNetTrain(nn.Module):
    """RankNet with its pairwise loss; ``(loss, (loss, scores, labels))`` like ``NextItemTrain``.

    In training, ``scores`` are ``B x (1 + num_negatives)`` (positive first);
    in eval mode, the scores of every item (for full ranking).
    """

    def __init__(self, model: RankNet, num_negatives: int = 4) -> None:
        super().__init__()
        self.model = model
        self.num_negatives = num_negatives

    def forward(self, batch) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:  # pyre-ignore
        labels = batch.labels
        if not self.training:
            scores = self.model.score_all(batch.sparse_features)
            return scores.new_zeros(()), (scores.new_zeros(()), scores, labels)
        negatives = torch.randint(0, self.model.num_items, (labels.numel(), self.num_negatives), device=labels.device)
        candidates = torch.cat([labels.clamp(min=0).unsqueeze(1), negatives], dim=1)
        scores = self.model(batch.sparse_features, candidates)
        real = (labels >= 0).to(scores.dtype).unsqueeze(1)  # padding rows (label -1) carry no loss
        pairwise = nn.functional.softplus(scores[:, 1:] - scores[:, :1]) * real  # RankNet: -log sigmoid(s+ - s-)
        loss = pairwise.sum() / (real.sum().clamp(min=1.0) * self.num_negatives)
        return loss, (loss.detach(), scores.detach(), labels)
