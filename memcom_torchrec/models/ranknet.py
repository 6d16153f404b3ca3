"""RankNet-style ranking: a (user, item) scorer trained with a pairwise loss against sampled negatives.

The query side pools the user's history (and user id) and maps it through an
MLP to a ``d``-vector; an item is its (possibly compressed) embedding from the
same item table the history uses; the score is their dot product. Training
uses RankNet's pairwise logistic loss ``log(1 + exp(s_neg - s_pos))`` against
``num_negatives`` uniformly sampled items per positive. Full-ranking evaluation
scores every item (``query @ item_table``), so the metric code is the same as
for the classifier.
"""

from typing import Optional, Sequence, Tuple

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from memcom_torchrec.models.next_item import HISTORY_FEATURE, USER_FEATURE, mlp

CANDIDATE_FEATURE = "candidate"


def ranking_features(features: KeyedJaggedTensor, candidates: torch.Tensor) -> KeyedJaggedTensor:
    """One KJT for a step: ``B`` query rows, then one row per candidate.

    Query rows carry the batch's history and user bags and an empty candidate
    bag; candidate rows carry one item id and empty history/user bags. One
    lookup (one all-to-all, one fused update of the item table) serves both.

    Args:
        features (KeyedJaggedTensor): the batch (keys ``user_id``, ``history``; ``B`` rows).
        candidates (torch.Tensor): item ids, any shape (``C`` in all).

    Returns:
        KeyedJaggedTensor: keys ``[history, user_id, candidate]``, ``B + C`` rows.
    """
    b = features.stride()
    ids = candidates.reshape(-1).long()
    c = ids.numel()
    device = features.values().device
    lengths = features.lengths().long().view(len(features.keys()), b)
    keys = features.keys()
    hist, user = lengths[keys.index(HISTORY_FEATURE)], lengths[keys.index(USER_FEATURE)]
    offsets = features.offset_per_key()
    hk, uk = keys.index(HISTORY_FEATURE), keys.index(USER_FEATURE)
    values = torch.cat([
        features.values()[offsets[hk] : offsets[hk + 1]].long(),
        features.values()[offsets[uk] : offsets[uk + 1]].long(),
        ids.to(device),
    ])
    zb = torch.zeros(b, dtype=torch.long, device=device)
    zc = torch.zeros(c, dtype=torch.long, device=device)
    all_lengths = torch.cat([hist, zc, user, zc, zb, torch.ones(c, dtype=torch.long, device=device)])
    return KeyedJaggedTensor(
        keys=[HISTORY_FEATURE, USER_FEATURE, CANDIDATE_FEATURE], values=values, lengths=all_lengths, stride=b + c
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
        self._item_vectors: Optional[torch.Tensor] = None  # eval-mode cache of every item's vector

    def _lookup(self, features: KeyedJaggedTensor, candidates: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Query vectors (``B x d``) and candidate embeddings (``candidates.shape + (d,)``), one lookup."""
        b = features.stride()
        pooled = self.embeddings(ranking_features(features, candidates)).to_dict()
        q = self.query(torch.cat([pooled[HISTORY_FEATURE][:b], pooled[USER_FEATURE][:b]], dim=1))
        return q, pooled[CANDIDATE_FEATURE][b:].view(*candidates.shape, -1)

    def forward(self, features: KeyedJaggedTensor, candidates: torch.Tensor) -> torch.Tensor:
        """Args: features, candidates (``B x C`` item ids). Returns: ``B x C`` scores."""
        q, items = self._lookup(features, candidates)
        return (items * q.unsqueeze(1)).sum(-1)

    def score_all(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Scores of every item: ``B x num_items`` (every rank must call it: it runs collectives when sharded).

        In eval mode without autograd the catalogue's vectors are embedded once
        and kept until the module goes back to training (``train()``), so an
        evaluation embeds the catalogue once, not once per batch.
        """
        device = features.values().device
        cache = not self.training and not torch.is_grad_enabled()
        if cache and self._item_vectors is not None:
            q, _ = self._lookup(features, torch.zeros(1, dtype=torch.long, device=device))  # the query only
            return q @ self._item_vectors.t()
        q, chunks = None, []
        for start in range(0, self.num_items, self.eval_chunk):
            items = torch.arange(start, min(start + self.eval_chunk, self.num_items), device=device)
            q, vectors = self._lookup(features, items)
            chunks.append(vectors)
        items = torch.cat(chunks)
        if cache:
            self._item_vectors = items
        return q @ items.t()

    def train(self, mode: bool = True) -> "RankNet":
        """Sets the mode; drops the cached catalogue vectors (their tables may change)."""
        self._item_vectors = None
        return super().train(mode)


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
