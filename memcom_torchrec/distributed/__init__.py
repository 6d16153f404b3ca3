"""Sharded MEmCom and QR modules for DistributedModelParallel."""

from memcom_torchrec.distributed.memcom_embeddingbag import (  # noqa: F401
    MEmComEmbeddingBagCollectionSharder,
    ShardedMEmComEmbeddingBagCollection,
)
from memcom_torchrec.distributed.qr_embeddingbag import (  # noqa: F401
    QREmbeddingBagCollectionSharder,
    ShardedQREmbeddingBagCollection,
)
