"""A table's tensors by role, from any collection: what the export and the reference sweep read.

The roles and their shapes are the table's storage description (``modules/storage.py``,
which lists them). This package's collections hand their tensors over with their
``dense_tables`` method; TorchRec's own ``EmbeddingBagCollection`` holds plain tables only.
"""

from typing import Dict

import torch
from torch import nn


def dense_tables(collection: nn.Module, table_name: str) -> Dict[str, torch.Tensor]:
    """The tensors of one table of ``collection``, by role.

    Raises:
        ValueError: ``collection`` is neither one of this package's nor TorchRec's EBC.
    """
    if hasattr(collection, "dense_tables"):
        return collection.dense_tables(table_name)
    if hasattr(collection, "embedding_bags"):  # TorchRec's EmbeddingBagCollection
        return {"weight": collection.embedding_bags[table_name].weight}
    raise ValueError(f"cannot export table '{table_name}' of a {type(collection).__name__}")

