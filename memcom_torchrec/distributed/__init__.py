"""Sharded twins of the MEmCom and QR collections, and their sharders, for DistributedModelParallel.

Depends on ``modules/`` and ``optim/`` only. The method registry (``modules.methods``) names each
method's sharder here by path, so nothing in ``modules/`` imports this package.
"""

from memcom_torchrec.distributed.memcom_embeddingbag import (  # noqa: F401
    MEmComEmbeddingBagCollectionSharder,
    ShardedMEmComEmbeddingBagCollection,
)
from memcom_torchrec.distributed.qr_embeddingbag import (  # noqa: F401
    QREmbeddingBagCollectionSharder,
    ShardedQREmbeddingBagCollection,
)
