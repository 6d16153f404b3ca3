"""MEmCom embedding compression for TorchRec.

Public API::

    from memcom_torchrec import (
        MEmComEmbeddingBagConfig,             # table config (dataclass)
        MEmComEmbeddingBagCollection,         # KJT -> KeyedTensor module
        MEmComEmbeddingBagCollectionSharder,  # for DistributedModelParallel
        ShardedMEmComEmbeddingBagCollection,
        QREmbeddingBagConfig,                 # quotient-remainder baseline (and memcom_qr)
        QREmbeddingBagCollection,
        QREmbeddingBagCollectionSharder,
        ShardedQREmbeddingBagCollection,
        table_memory,                         # bytes and compression ratio
    )

The package layout, dependencies pointing down::

    launch/, experiment/ -> train/ -> models/, distributed/, eval/, data/
    models/ -> modules/;  distributed/ -> modules/, optim/;  eval/ -> data/
    export/ -> models/ -> modules/

The names above are loaded on first use, so that torch-free parts (the configs
``train.config`` and ``models.config`` that ``launch/`` reads) import without torch.
"""

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "MEmComEmbeddingBagConfig": "memcom_torchrec.modules.memcom_configs",
    "compression_ratio": "memcom_torchrec.modules.memcom_configs",
    "num_buckets_for_ratio": "memcom_torchrec.modules.memcom_configs",
    "MEmComEmbeddingBagCollection": "memcom_torchrec.modules.memcom_embedding_modules",
    "TableMemory": "memcom_torchrec.modules.memory",
    "table_memory": "memcom_torchrec.modules.memory",
    "MEmComEmbeddingBagCollectionSharder": "memcom_torchrec.distributed.memcom_embeddingbag",
    "ShardedMEmComEmbeddingBagCollection": "memcom_torchrec.distributed.memcom_embeddingbag",
    "QREmbeddingBagConfig": "memcom_torchrec.modules.qr_configs",
    "QREmbeddingBagCollection": "memcom_torchrec.modules.qr_embedding_modules",
    "QREmbeddingBagCollectionSharder": "memcom_torchrec.distributed.qr_embeddingbag",
    "ShardedQREmbeddingBagCollection": "memcom_torchrec.distributed.qr_embeddingbag",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'memcom_torchrec' has no attribute '{name}'")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
