"""Fused sparse optimizers for per-entity weights (MEmCom's and memcom_qr's w)."""

from memcom_torchrec.optim.entity_weight_optimizer import (  # noqa: F401
    EntityWeightOptimizerConfig,
    entity_weight_lookup,
    sparse_update_,
)
from memcom_torchrec.optim.fused import EntityWeightFusedOptimizer  # noqa: F401
