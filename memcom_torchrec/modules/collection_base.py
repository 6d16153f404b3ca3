"""What every collection of this package shares with TorchRec's interface: its table configs and weighting."""

from typing import List

from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface


class CollectionBase(EmbeddingBagCollectionInterface):
    """Base of the MEmCom, QR, low-rank and mixed-dimension collections (KeyedJaggedTensor in, KeyedTensor out).

    Args:
        tables (List[EmbeddingBagConfig]): the table configs, at least one.
        is_weighted (bool): whether input KJTs carry per-id weights.
    """

    def __init__(self, tables: List[EmbeddingBagConfig], is_weighted: bool) -> None:
        super().__init__()
        if not tables:
            raise ValueError(f"{type(self).__name__} needs at least one table")
        self._embedding_bag_configs: List[EmbeddingBagConfig] = tables
        self._is_weighted = is_weighted

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        """Returns: the table configs this collection was built from."""
        return self._embedding_bag_configs

    def is_weighted(self) -> bool:
        """Returns: whether input KJTs carry per-id weights."""
        return self._is_weighted

