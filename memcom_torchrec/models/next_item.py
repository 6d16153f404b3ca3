"""Next-item classification: user history (and id) -> softmax over the catalogue."""

from typing import List, Sequence, Tuple

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

USER_FEATURE, HISTORY_FEATURE = "user_id", "history"


def mlp(in_dim: int, hidden: Sequence[int], dropout: float) -> Tuple[nn.Sequential, int]:
    """ReLU MLP; returns the module and its output width."""
    layers: List[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(in_dim, h), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        in_dim = h
    return nn.Sequential(*layers), in_dim


class NextItemClassifier(nn.Module):
    """Pooled history (+ user) embeddings -> MLP -> logits over every item.

    The embedding collection may be compressed; the output layer (one row per
    item) stays uncompressed: the compression ratio counts the input tables.

    Args:
        embeddings (nn.Module): KJT -> KeyedTensor collection with features
            ``history`` (the bag of recent items) and ``user_id``.
        embedding_dim (int): width of every pooled feature.
        num_items (int): catalogue size (logits).
        hidden (Sequence[int]): MLP widths.
        dropout (float): MLP dropout.

    Example::

        logits = model(batch.sparse_features)  # B x num_items
    """

    def __init__(
        self,
        embeddings: nn.Module,
        embedding_dim: int,
        num_items: int,
        hidden: Sequence[int] = (256,),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.embeddings = embeddings
        self.features = [HISTORY_FEATURE, USER_FEATURE]
        self.mlp, out = mlp(embedding_dim * len(self.features), hidden, dropout)
        self.output = nn.Linear(out, num_items)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Args: features (KJT with the model's features). Returns: ``B x num_items`` logits."""
        pooled = self.embeddings(features).to_dict()
        x = torch.cat([pooled[HISTORY_FEATURE], pooled[USER_FEATURE]], dim=1)
        return self.output(self.mlp(x))


class NextItemTrain(nn.Module):
    """Wraps a model with its loss for TorchRec's train pipelines: returns ``(loss, (loss, scores, labels))``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:  # pyre-ignore
        logits = self.model(batch.sparse_features)
        # Mean over the real rows without control flow (TorchRec's pipeline traces
        # this with torch.fx): padding rows (label -1, see data.pad_batch) are
        # ignored, and an all-padding batch gives a zero loss.
        count = (batch.labels >= 0).to(logits.dtype).sum().clamp(min=1.0)
        loss = nn.functional.cross_entropy(logits, batch.labels, reduction="sum", ignore_index=-1) / count
        return loss, (loss.detach(), logits.detach(), batch.labels)

    def scores(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Scores of every item (for full-ranking evaluation)."""
        return self.model(features)
