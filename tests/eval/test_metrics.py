"""Full-ranking metrics against a straightforward reference."""

import math
import statistics

import pytest
import torch

from memcom_torchrec.eval.metrics import RankingTotals, ranking_totals, target_ranks


def reference_rank(scores, target, excluded):
    """Sort-free reference: count the competitors that beat or tie the target."""
    s_t = scores[target]
    rank = 1
    for j, s in enumerate(scores):
        if j == target or j in excluded:
            continue
        if s >= s_t:
            rank += 1
    return rank


CASES = [
    # scores, target, excluded
    ([0.1, 0.9, 0.5, 0.3], 2, []),            # plain: rank 2
    ([0.1, 0.9, 0.5, 0.3], 2, [1]),           # the better item was seen: rank 1
    ([0.5, 0.5, 0.5, 0.5], 0, []),            # all tied: ties count against the model -> rank 4
    ([0.2, 0.7, 0.7, 0.1], 2, [3]),           # tie with one other item -> rank 2
    ([0.9, 0.8, 0.1], 1, [1, 0]),             # target listed as seen (repeat): never masked -> rank 1
    ([0.3], 0, []),                           # one-item catalogue
]


@pytest.mark.parametrize("scores,target,excluded", CASES)
def test_target_rank_matches_reference(scores, target, excluded) -> None:
    got = target_ranks(
        torch.tensor([scores]), torch.tensor([target]), torch.tensor([len(excluded)]), torch.tensor(excluded, dtype=torch.long)
    )
    assert int(got[0]) == reference_rank(scores, target, set(excluded) - {target})


def test_nan_scores_rank_last() -> None:
    """A diverged model must not look perfect: NaN items rank above the target, a NaN target ranks last."""
    nan = float("nan")
    scores = torch.tensor([[0.9, nan, 0.1, 0.5], [nan, nan, nan, nan], [nan, 0.2, 0.3, 0.4]])
    ranks = target_ranks(scores, torch.tensor([0, 2, 0]), torch.tensor([0, 1, 1]), torch.tensor([3, 3]))
    assert ranks.tolist() == [2, 3, 3]
    assert ranking_totals(ranks, k=1).hits == 0


def test_batch_of_users_and_metric_values() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(7, 30, generator=g).round(decimals=1)  # rounding creates ties
    targets = torch.randint(0, 30, (7,), generator=g)
    excluded = [torch.randint(0, 30, (int(n),), generator=g).tolist() for n in [0, 3, 1, 5, 0, 2, 10]]
    ranks = target_ranks(
        scores, targets, torch.tensor([len(e) for e in excluded]), torch.tensor([i for e in excluded for i in e])
    )
    expected = [reference_rank(scores[b].tolist(), int(targets[b]), set(excluded[b]) - {int(targets[b])}) for b in range(7)]
    assert ranks.tolist() == expected
    totals = ranking_totals(ranks, k=10)
    assert totals.count == 7
    assert totals.hits == sum(r <= 10 for r in expected)
    assert totals.ndcg == pytest.approx(sum(1 / math.log2(r + 1) for r in expected if r <= 10))
    assert RankingTotals.from_tensor(totals.as_tensor()).mean_ndcg == pytest.approx(totals.mean_ndcg)


def test_ndcg_standard_error_sums_across_batches() -> None:
    ranks = [1, 3, 12, 2, 7, 40, 1, 5]
    per_user = [1 / math.log2(r + 1) if r <= 10 else 0.0 for r in ranks]
    a = ranking_totals(torch.tensor(ranks[:3]), k=10)
    b = RankingTotals.from_tensor(ranking_totals(torch.tensor(ranks[3:]), k=10).as_tensor())  # the all-reduce's trip
    totals = a.add(b)
    assert totals.mean_ndcg == pytest.approx(statistics.mean(per_user))
    assert totals.ndcg_se == pytest.approx(statistics.stdev(per_user) / math.sqrt(len(per_user)))
    assert ranking_totals(torch.tensor([4]), k=10).ndcg_se == 0.0  # one user: no spread to measure


def test_empty_batch() -> None:
    ranks = target_ranks(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long))
    assert ranking_totals(ranks).count == 0
