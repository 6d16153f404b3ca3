"""Sharded MEmCom modules for DistributedModelParallel."""

from memcom_torchrec.distributed.memcom_embeddingbag import (  # noqa: F401
    MEmComEmbeddingBagCollectionSharder,
    ShardedMEmComEmbeddingBagCollection,
)
