"""Unsharded modules: configs, the MEmCom and the quotient-remainder EmbeddingBagCollections."""

from memcom_torchrec.modules.memcom_configs import (  # noqa: F401
    MEmComEmbeddingBagConfig,
    compression_ratio,
    num_buckets_for_ratio,
)
from memcom_torchrec.modules.memcom_embedding_modules import (  # noqa: F401
    MEmComEmbeddingBagCollection,
)
from memcom_torchrec.modules.qr_configs import (  # noqa: F401
    QREmbeddingBagConfig,
    max_qr_compression_ratio,
    num_collisions_for_ratio,
    qr_compression_ratio,
)
from memcom_torchrec.modules.qr_embedding_modules import QREmbeddingBagCollection  # noqa: F401
