"""Evaluation: full-ranking metrics and the popularity baseline."""

from memcom_torchrec.eval.metrics import RankingTotals, ranking_totals, target_ranks  # noqa: F401
