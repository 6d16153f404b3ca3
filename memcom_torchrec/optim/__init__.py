"""Fused sparse optimizers for MEmCom's per-entity weights."""

from memcom_torchrec.optim.entity_weight_optimizer import (  # noqa: F401
    EntityWeightOptimizerConfig,
    entity_weight_lookup,
    sparse_update_,
)
