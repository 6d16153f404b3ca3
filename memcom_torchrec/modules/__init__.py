"""Unsharded modules: configs and the MEmCom EmbeddingBagCollection."""

from memcom_torchrec.modules.memcom_configs import (  # noqa: F401
    MEmComEmbeddingBagConfig,
    compression_ratio,
    num_buckets_for_ratio,
)
from memcom_torchrec.modules.memcom_embedding_modules import (  # noqa: F401
    MEmComEmbeddingBagCollection,
)
