"""Pieces the models share: feature names, the MLP, and the query + catalogue lookup.

A model's query side pools the user's history (and, unless the model is
phone-shaped, the user id). Scorers that compare the query with items read
the items from the same (possibly compressed) item table through a
``candidate`` feature, so one lookup, one all-to-all and one fused update
serve the history and the catalogue (``CatalogueModel``).
"""

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

USER_FEATURE, HISTORY_FEATURE, CANDIDATE_FEATURE = "user_id", "history", "candidate"


def query_features(use_user_id: bool) -> List[str]:
    """The features a model pools into its query: ``history`` (and ``user_id``)."""
    return [HISTORY_FEATURE, USER_FEATURE] if use_user_id else [HISTORY_FEATURE]


def mlp(in_dim: int, hidden: Sequence[int], dropout: float) -> Tuple[nn.Sequential, int]:
    """ReLU MLP; returns the module and its output width."""
    layers: List[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(in_dim, h), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        in_dim = h
    return nn.Sequential(*layers), in_dim


def ranking_features(features: KeyedJaggedTensor, candidates: torch.Tensor) -> KeyedJaggedTensor:
    """One KJT for a step: ``B`` query rows, then one row per candidate.

    Query rows carry the batch's bags (every key of ``features``) and an empty
    candidate bag; candidate rows carry one item id and empty query bags.

    Args:
        features (KeyedJaggedTensor): the batch (``B`` rows, e.g. keys ``user_id``, ``history``).
        candidates (torch.Tensor): item ids, any shape (``C`` in all).

    Returns:
        KeyedJaggedTensor: keys ``features.keys() + [candidate]``, ``B + C`` rows.
    """
    b = features.stride()
    ids = candidates.reshape(-1).long()
    c = ids.numel()
    device = features.values().device
    keys = features.keys()
    lengths = features.lengths().long().view(len(keys), b)
    values = features.values().long()
    zc = torch.zeros(c, dtype=torch.long, device=device)
    all_lengths = [t for k in range(len(keys)) for t in (lengths[k], zc)]
    all_lengths += [torch.zeros(b, dtype=torch.long, device=device), torch.ones(c, dtype=torch.long, device=device)]
    return KeyedJaggedTensor(
        keys=list(keys) + [CANDIDATE_FEATURE],
        values=torch.cat([values, ids.to(device)]),
        lengths=torch.cat(all_lengths),
        stride=b + c,
    )


class CatalogueModel(nn.Module):
    """Base of models that score items by their vectors in the (shared) item table.

    Args:
        embeddings (nn.Module): KJT -> KeyedTensor collection with ``history`` and
            ``candidate`` on the item table (and ``user_id`` on the user table).
        num_items (int): catalogue size.
        features (List[str]): the query's pooled features (``query_features``).
        eval_chunk (int): items embedded at once when the whole catalogue is embedded.
    """

    def __init__(self, embeddings: nn.Module, num_items: int, features: List[str], eval_chunk: int = 65536) -> None:
        super().__init__()
        self.embeddings = embeddings
        self.num_items = num_items
        self.features = features
        self.eval_chunk = eval_chunk
        self._item_vectors: Optional[torch.Tensor] = None  # eval-mode cache of every item's vector

    def lookup(self, features: KeyedJaggedTensor, candidates: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Pooled query features (``B x (F*d)``) and candidate vectors (``candidates.shape + (d,)``), one lookup."""
        b = features.stride()
        pooled = self.embeddings(ranking_features(features, candidates)).to_dict()
        x = torch.cat([pooled[f][:b] for f in self.features], dim=1)
        return x, pooled[CANDIDATE_FEATURE][b:].view(*candidates.shape, -1)

    def lookup_catalogue(self, features: KeyedJaggedTensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Pooled query features and every item's vector (``num_items x d``).

        Every rank must call it (it runs collectives when sharded). In eval mode
        without autograd the catalogue is embedded once and kept until the module
        goes back to training (``train()``), so an evaluation embeds it once.
        """
        device = features.values().device
        cache = not self.training and not torch.is_grad_enabled()
        if cache and self._item_vectors is not None:
            x, _ = self.lookup(features, torch.zeros(1, dtype=torch.long, device=device))  # the query only
            return x, self._item_vectors
        x, chunks = None, []
        for start in range(0, self.num_items, self.eval_chunk):
            items = torch.arange(start, min(start + self.eval_chunk, self.num_items), device=device)
            x, vectors = self.lookup(features, items)
            chunks.append(vectors)
        items = torch.cat(chunks)
        if cache:
            self._item_vectors = items
        return x, items

    def train(self, mode: bool = True) -> "CatalogueModel":
        """Sets the mode; drops the cached catalogue vectors (their tables may change)."""
        self._item_vectors = None
        return super().train(mode)
