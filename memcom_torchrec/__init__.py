"""MEmCom embedding compression for TorchRec.

Public API::

    from memcom_torchrec import (
        MEmComEmbeddingBagConfig,             # table config (dataclass)
        MEmComEmbeddingBagCollection,         # KJT -> KeyedTensor module
        MEmComEmbeddingBagCollectionSharder,  # for DistributedModelParallel
        ShardedMEmComEmbeddingBagCollection,
        table_memory,                         # bytes and compression ratio
    )
"""

from memcom_torchrec.modules.memcom_configs import (  # noqa: F401
    MEmComEmbeddingBagConfig,
    compression_ratio,
    num_buckets_for_ratio,
)
from memcom_torchrec.modules.memcom_embedding_modules import MEmComEmbeddingBagCollection  # noqa: F401
from memcom_torchrec.modules.memory import TableMemory, collection_memory, table_memory  # noqa: F401
from memcom_torchrec.distributed.memcom_embeddingbag import (  # noqa: F401
    MEmComEmbeddingBagCollectionSharder,
    ShardedMEmComEmbeddingBagCollection,
)

__version__ = "0.1.0"
