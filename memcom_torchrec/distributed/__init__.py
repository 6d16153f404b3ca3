"""Sharded twins of the MEmCom and QR collections, and their sharders, for DistributedModelParallel.

Depends on ``modules/`` and ``optim/`` only. The method registry (``modules.methods``) names each
method's sharder here by path, so nothing in ``modules/`` imports this package. What both sharded
collections keep of their per-entity weights ``w`` (local slices, ShardedTensors, state_dict, the
planner's extra columns) lives once in ``entity_weights``.
"""

from memcom_torchrec.distributed.memcom_embeddingbag import (  # noqa: F401
    MEmComEmbeddingBagCollectionSharder,
    ShardedMEmComEmbeddingBagCollection,
)
from memcom_torchrec.distributed.qr_embeddingbag import (  # noqa: F401
    QREmbeddingBagCollectionSharder,
    ShardedQREmbeddingBagCollection,
)
