"""Evaluation: full-ranking metrics (nDCG@k, HR@k) and the popularity baseline.

Depends on ``data/`` only; the trainer and the experiment grid use it (the grid
itself lives in ``memcom_torchrec.experiment``).
"""

from memcom_torchrec.eval.metrics import RankingTotals, ranking_totals, target_ranks  # noqa: F401
