"""RankNet-style ranking: a (user, item) scorer trained with a pairwise loss against sampled negatives.

The query side pools the user's history (and user id) and maps it through an
MLP to a ``d``-vector; an item is its (possibly compressed) embedding from the
same item table the history uses; the score is their dot product. Training
uses RankNet's pairwise logistic loss ``log(1 + exp(s_neg - s_pos))`` against
``num_negatives`` uniformly sampled items per positive. Full-ranking evaluation
scores every item (``query @ item_table``), so the metric code is the same as
for the classifier.
"""

from typing import Sequence, Tuple

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from memcom_torchrec.models.next_item import HISTORY_FEATURE, USER_FEATURE, mlp

CANDIDATE_FEATURE = "candidate"


def candidate_features(features: KeyedJaggedTensor, candidates: torch.Tensor) -> KeyedJaggedTensor:
    """A KJT with one candidate id per row and empty history/user bags.

    Args:
        features (KeyedJaggedTensor): the batch's features (for keys and device).
        candidates (torch.Tensor): item ids, any shape.

    Returns:
        KeyedJaggedTensor: keys ``[history, user_id, candidate]``, ``candidates.numel()`` rows.
    """
    ids = candidates.reshape(-1).long()
    n = ids.numel()
    zeros = torch.zeros(n, dtype=torch.long, device=ids.device)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=[HISTORY_FEATURE, USER_FEATURE, CANDIDATE_FEATURE],
        values=ids,
        lengths=torch.cat([zeros, zeros, torch.ones(n, dtype=torch.long, device=ids.device)]),
    )


def query_features(features: KeyedJaggedTensor) -> KeyedJaggedTensor:
    """The batch's history and user bags plus an empty candidate bag per row."""
    b = features.stride()
    d = features.to_dict() if b else None
    hist, user = (d[HISTORY_FEATURE], d[USER_FEATURE]) if d else (None, None)
    empty = torch.zeros(b, dtype=torch.long, device=features.values().device)
    if d is None:
        values, lengths = features.values().long()[:0], torch.zeros(0, dtype=torch.long)
    else:
        values = torch.cat([hist.values().long(), user.values().long()])
        lengths = torch.cat([hist.lengths().long(), user.lengths().long(), empty])
    return KeyedJaggedTensor.from_lengths_sync(
        keys=[HISTORY_FEATURE, USER_FEATURE, CANDIDATE_FEATURE], values=values, lengths=lengths, stride=b
    )


class RankNet(nn.Module):
    """Dot-product (query, item) scorer on a shared item table.

    Args:
        embeddings (nn.Module): KJT -> KeyedTensor collection with features
            ``history`` and ``candidate`` in the item table, ``user_id`` in the user table.
        embedding_dim (int): ``d``.
        num_items (int): catalogue size.
        hidden (Sequence[int]): query MLP widths.
        dropout (float): MLP dropout.
        eval_chunk (int): items embedded at once when scoring the whole catalogue.

    Example::

        scores = model(features, candidates)   # B x C
        all_scores = model.score_all(features)  # B x num_items
    """

    def __init__(
        self,
        embeddings: nn.Module,
        embedding_dim: int,
        num_items: int,
        hidden: Sequence[int] = (256,),
        dropout: float = 0.0,
        eval_chunk: int = 65536,
    ) -> None:
        super().__init__()
        self.embeddings = embeddings
        self.num_items = num_items
        self.eval_chunk = eval_chunk
        body, out = mlp(2 * embedding_dim, hidden, dropout)
        self.query = nn.Sequential(body, nn.Linear(out, embedding_dim))

    def query_vectors(self, features: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.embeddings(query_features(features)).to_dict()
        return self.query(torch.cat([pooled[HISTORY_FEATURE], pooled[USER_FEATURE]], dim=1))

    def item_vectors(self, features: KeyedJaggedTensor, items: torch.Tensor) -> torch.Tensor:
        """Embeddings of ``items`` (any shape) -> ``items.shape + (d,)``."""
        pooled = self.embeddings(candidate_features(features, items)).to_dict()[CANDIDATE_FEATURE]
        return pooled.view(*items.shape, -1)

    def forward(self, features: KeyedJaggedTensor, candidates: torch.Tensor) -> torch.Tensor:
        """Args: features, candidates (``B x C`` item ids). Returns: ``B x C`` scores."""
        q = self.query_vectors(features)
        return (self.item_vectors(features, candidates) * q.unsqueeze(1)).sum(-1)

    def score_all(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Scores of every item: ``B x num_items`` (every rank must call it: it runs collectives when sharded)."""
        q = self.query_vectors(features)
        device = q.device
        chunks = []
        for start in range(0, self.num_items, self.eval_chunk):
            items = torch.arange(start, min(start + self.eval_chunk, self.num_items), device=device)
            chunks.append(self.item_vectors(features, items))
        return q @ torch.cat(chunks).t()


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
        candidates = torch.cat([labels.unsqueeze(1), negatives], dim=1)
        scores = self.model(batch.sparse_features, candidates)
        pairwise = nn.functional.softplus(scores[:, 1:] - scores[:, :1])  # RankNet: -log sigmoid(s_pos - s_neg)
        count = torch.ones_like(labels, dtype=scores.dtype).sum().clamp(min=1.0) * self.num_negatives
        loss = pairwise.sum() / count
        return loss, (loss.detach(), scores.detach(), labels)
