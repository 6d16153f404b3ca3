"""Full-ranking metrics: nDCG@k and HR@k of one held-out item per user.

Every run computes its figures with these functions, so numbers are comparable.

Protocol: every item of the catalogue is scored; the items the user saw
before (``exclude``) are removed, except the target itself; the target's rank
is ``1 + #{items scoring above it} + #{other items scoring equal}`` (ties are
counted against the model, so a constant scorer gets no credit).
``nDCG@k = 1 / log2(rank + 1)`` if ``rank <= k`` else 0; ``HR@k = [rank <= k]``.
"""

from dataclasses import dataclass
from typing import Iterable, Optional, Tuple

import torch


@dataclass
class RankingTotals:
    """Sums over users, to be added across batches and ranks.

    Args:
        ndcg (float): sum of nDCG@k.
        hits (float): sum of HR@k.
        count (int): users.
        ndcg_sq (float): sum of squared nDCG@k (for ``ndcg_se``).
    """

    ndcg: float = 0.0
    hits: float = 0.0
    count: int = 0
    ndcg_sq: float = 0.0

    def add(self, other: "RankingTotals") -> "RankingTotals":
        return RankingTotals(self.ndcg + other.ndcg, self.hits + other.hits, self.count + other.count,
                             self.ndcg_sq + other.ndcg_sq)

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([self.ndcg, self.hits, float(self.count), self.ndcg_sq], dtype=torch.float64)

    @staticmethod
    def from_tensor(t: torch.Tensor) -> "RankingTotals":
        return RankingTotals(float(t[0]), float(t[1]), int(round(float(t[2]))), float(t[3]))

    @property
    def mean_ndcg(self) -> float:
        return self.ndcg / self.count if self.count else 0.0

    @property
    def mean_hr(self) -> float:
        return self.hits / self.count if self.count else 0.0

    @property
    def ndcg_se(self) -> float:
        """Standard error of ``mean_ndcg`` over users (sample variance / count; 0 below two users)."""
        if self.count < 2:
            return 0.0
        var = max(self.ndcg_sq - self.count * self.mean_ndcg**2, 0.0) / (self.count - 1)
        return (var / self.count) ** 0.5


def target_ranks(
    scores: torch.Tensor,
    targets: torch.Tensor,
    exclude_lengths: Optional[torch.Tensor] = None,
    exclude_values: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """1-based rank of each target among all non-excluded items.

    Args:
        scores (torch.Tensor): ``B x n`` scores.
        targets (torch.Tensor): ``B`` target item ids.
        exclude_lengths (Optional[torch.Tensor]): ``B`` counts of excluded items.
        exclude_values (Optional[torch.Tensor]): the excluded item ids, row-major.

    Returns:
        torch.Tensor: ``B`` int64 ranks.
    """
    scores = scores.float()
    b, n = scores.shape
    if b == 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    targets = targets.long()
    excluded = torch.zeros(b, n, dtype=torch.bool, device=scores.device)
    if exclude_lengths is not None and exclude_values is not None and exclude_values.numel():
        rows = torch.repeat_interleave(torch.arange(b, device=scores.device), exclude_lengths.long())
        excluded[rows, exclude_values.long()] = True
    excluded[torch.arange(b, device=scores.device), targets] = False
    target_scores = scores.gather(1, targets.unsqueeze(1))
    # A NaN target ranks last and a NaN item counts as above the target, so a
    # diverged model scores 0, never a perfect rank.
    above = ((scores > target_scores) | scores.isnan() | target_scores.isnan()) & ~excluded
    ties = (scores == target_scores) & ~excluded
    return 1 + above.sum(1) + ties.sum(1) - 1  # the target ties with itself (a NaN target: counted in above)


def ranking_totals(ranks: torch.Tensor, k: int = 10) -> RankingTotals:
    """nDCG@k and HR@k sums of a batch of target ranks."""
    ranks = ranks.double()
    hit = ranks <= k
    ndcg = torch.where(hit, 1.0 / torch.log2(ranks + 1.0), torch.zeros_like(ranks))
    return RankingTotals(float(ndcg.sum()), float(hit.sum()), int(ranks.numel()), float((ndcg * ndcg).sum()))


# One batch for ``rank_batches``: scores (``B x n``), targets (``B``), and the excluded items'
# lengths (``B``) and values (row-major), or ``None`` for no exclusions.
ScoredBatch = Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]


def rank_batches(batches: Iterable[ScoredBatch], k: int = 10) -> RankingTotals:
    """The ranking loop: nDCG@k and HR@k sums over scored batches (``target_ranks`` then ``ranking_totals``).

    Args:
        batches (Iterable[ScoredBatch]): ``(scores, targets, exclude_lengths, exclude_values)`` per batch.
        k (int): cut-off.

    Returns:
        RankingTotals: sums over every row of every batch.
    """
    totals = RankingTotals()
    for scores, targets, exclude_lengths, exclude_values in batches:
        totals = totals.add(ranking_totals(target_ranks(scores, targets, exclude_lengths, exclude_values).cpu(), k))
    return totals
