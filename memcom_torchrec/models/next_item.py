"""Next-item classification: user history (and id) -> a score for every item of the catalogue.

Two scorers (registered in ``models.scorers``):

- ``linear``: an output layer with one uncompressed row per item, ``logit_i = <h, o_i> + b_i``;
- ``tied``: the logits come from the (possibly compressed) input item table,
  ``logit_i = <q, e_i> + b_i`` with ``q`` the MLP's output projected to ``d``.
  For MEmCom that is ``w_i * (q U^T)[i mod m] + b_i``: the model holds no
  ``n x hidden`` output layer, which is what makes a phone model slim.
"""

from typing import Optional, Sequence, Tuple

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from memcom_torchrec.models.layers import CatalogueModel, mlp, query_features
from memcom_torchrec.models.scorers import LINEAR, NEXT_ITEM, get_scorer


class NextItemClassifier(CatalogueModel):
    """Pooled history (+ user) embeddings -> MLP -> logits over every item.

    Args:
        embeddings (nn.Module): KJT -> KeyedTensor collection with features
            ``history`` (the bag of recent items), ``user_id`` (if ``use_user_id``)
            and ``candidate`` on the item table (if ``scorer="tied"``).
        embedding_dim (int): width of every pooled feature.
        num_items (int): catalogue size (logits).
        hidden (Sequence[int]): MLP widths.
        dropout (float): MLP dropout.
        use_user_id (bool): pool the user id into the query (False: a phone-shaped
            model that needs only the user's recent items).
        scorer (str): a ``next_item`` scorer, ``linear`` or ``tied`` (see the module docstring).

    Example::

        logits = model(batch.sparse_features)  # B x num_items
    """

    model_kind: str = NEXT_ITEM

    def __init__(
        self,
        embeddings: nn.Module,
        embedding_dim: int,
        num_items: int,
        hidden: Sequence[int] = (256,),
        dropout: float = 0.0,
        use_user_id: bool = True,
        scorer: str = LINEAR.name,
    ) -> None:
        spec = get_scorer(self.model_kind, scorer)
        super().__init__(embeddings, num_items, query_features(use_user_id))
        self.scorer = scorer
        self.scorer_spec = spec
        self.mlp, out = mlp(embedding_dim * len(self.features), hidden, dropout)
        if spec.output_layer:
            self.output = nn.Linear(out, num_items)
        else:
            self.head = nn.Linear(out, embedding_dim)
            self.item_bias = nn.Parameter(torch.zeros(num_items))

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Args: features (KJT with the model's features). Returns: ``B x num_items`` logits."""
        if self.scorer_spec.output_layer:
            pooled = self.embeddings(features).to_dict()
            return self.output(self.mlp(torch.cat([pooled[f] for f in self.features], dim=1)))
        x, items = self.lookup_catalogue(features)
        return self.head(self.mlp(x)) @ items.t() + self.item_bias


def cross_entropy_over_real_rows(
    logits: torch.Tensor, labels: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy averaged over the real rows (padding rows, label ``-1``, count for nothing).

    Returns:
        Tuple[torch.Tensor, torch.Tensor, torch.Tensor]: the loss, the ``B`` 0/1 row mask, the real
        row count (at least 1, so an all-padding batch gives a zero loss).
    """
    real = (labels >= 0).to(logits.dtype)
    count = real.sum().clamp(min=1.0)
    return nn.functional.cross_entropy(logits, labels, reduction="sum", ignore_index=-1) / count, real, count


def distillation_loss(
    logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor, alpha: float, temperature: float
) -> torch.Tensor:
    """``(1 - a) CE(student, target) + a T^2 KL(softmax(teacher / T) || softmax(student / T))``, mean over real rows.

    Args:
        logits (torch.Tensor): the student's ``B x n`` logits.
        labels (torch.Tensor): target item per row; padding rows (``-1``) count in neither term.
        teacher_logits (torch.Tensor): the teacher's ``B x n`` logits (no gradient flows into them).
        alpha (float): ``a``, the weight of the distillation term.
        temperature (float): ``T``; ``T^2`` keeps the term's gradient scale independent of ``T``.

    Returns:
        torch.Tensor: the scalar loss.
    """
    ce, real, count = cross_entropy_over_real_rows(logits, labels)
    kl = nn.functional.kl_div(
        nn.functional.log_softmax(logits / temperature, dim=1),
        nn.functional.log_softmax(teacher_logits.detach() / temperature, dim=1),
        reduction="none", log_target=True,
    ).sum(dim=1)
    return (1.0 - alpha) * ce + alpha * temperature**2 * (kl * real).sum() / count


class NextItemTrain(nn.Module):
    """Wraps a model with its loss for TorchRec's train pipelines: returns ``(loss, (loss, scores, labels))``.

    Args:
        model (nn.Module): a ``NextItemClassifier``.
        distill (Optional[Tuple[float, float]]): ``(alpha, temperature)``: train on
            ``distillation_loss`` against each batch's ``soft_targets`` (a teacher's
            logits); None: cross-entropy alone.
    """

    def __init__(self, model: nn.Module, distill: Optional[Tuple[float, float]] = None) -> None:
        super().__init__()
        self.model = model
        self.distill = distill

    def forward(self, batch) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:  # pyre-ignore
        logits = self.model(batch.sparse_features)
        # Mean over the real rows without control flow on tensors (TorchRec's pipeline
        # traces this with torch.fx): padding rows (label -1, see data.pad_batch) are
        # ignored, and an all-padding batch gives a zero loss.
        if self.distill is not None and self.training:
            loss = distillation_loss(logits, batch.labels, batch.soft_targets, *self.distill)
        else:
            loss = cross_entropy_over_real_rows(logits, batch.labels)[0]
        return loss, (loss.detach(), logits.detach(), batch.labels)

    def scores(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Scores of every item (for full-ranking evaluation)."""
        return self.model(features)
