"""Unsharded modules: the embedding methods and the collections that store them.

- ``methods``: the registry, every embedding method defined once (config builder, ratio rule
  and maximum, collection, sharder);
- ``memcom_configs``, ``memcom_embedding_modules``: MEmCom (and the hashing trick);
- ``qr_configs``, ``qr_embedding_modules``: quotient-remainder (and ``memcom_qr``);
- ``lowrank_configs``, ``lowrank_embedding_modules``: low-rank tables, ``P A[i]``;
- ``mixed_dim_configs``, ``mixed_dim_embedding_modules``: mixed-dimension tables (full rows for the
  most frequent entities, projected narrow rows for the rest);
- ``collection_base``: what every collection shares;
- ``storage``: ``table_storage``, the one description of a table's layout and the only source
  of compression ratios (``TableStorage.compression_ratio``);
- ``memory``: ``table_memory``, bytes and optimizer state under a fused optimizer;
- ``validation``: clear errors for bad input.

Nothing here imports ``distributed/`` (sharders are named in the registry, resolved on use).
"""

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
)
from memcom_torchrec.modules.qr_embedding_modules import QREmbeddingBagCollection  # noqa: F401
