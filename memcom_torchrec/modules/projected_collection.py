"""ProjectedCollection: the base of the collections whose narrow rows a shared dense ``P`` lifts to ``d``."""

import math
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from memcom_torchrec.modules.collection_base import CollectionBase
from memcom_torchrec.modules.memcom_embedding_modules import MEmComEmbeddingBagCollection


class Projection(nn.Linear):
    """``P``: ``k -> d`` without bias, initialised so that ``P A[i]`` starts at a plain table's scale.

    With ``A`` uniform in ``+-sqrt(1/n)`` (TorchRec's default) and ``P`` uniform in
    ``+-sqrt(3/k)`` (variance ``1/k``), each entry of ``P A[i]`` has the variance of a plain
    table's entry.
    """

    def __init__(self, rank: int, embedding_dim: int, device: Optional[Union[str, torch.device]] = None) -> None:
        super().__init__(rank, embedding_dim, bias=False, device=device)

    def reset_parameters(self) -> None:
        bound = math.sqrt(3.0 / self.in_features)
        nn.init.uniform_(self.weight, -bound, bound)


class ProjectedCollection(CollectionBase):
    """Base of the collections whose narrow rows a shared dense ``P`` lifts to ``d`` (low-rank, mixed-dimension).

    The rows live in ``_embedding_bag_collection``, a ``MEmComEmbeddingBagCollection`` of plain tables
    (FBGEMM looks them up and DMP shards them with MEmCom's sharder); ``_projections`` holds one
    ``Projection`` per projected table, a dense layer.

    Args:
        tables (List[EmbeddingBagConfig]): the outer table configs.
        is_weighted (bool): whether input KJTs carry per-id weights.
        row_tables (List[EmbeddingBagConfig]): the plain tables of the inner collection.
        projections (Dict[str, Tuple[int, int]]): table name -> ``(k, d)`` of its ``P``.
        device (Optional[torch.device]): device, ``meta`` for lazy init.
    """

    def __init__(
        self,
        tables: List[EmbeddingBagConfig],
        is_weighted: bool,
        row_tables: List[EmbeddingBagConfig],
        projections: Dict[str, Tuple[int, int]],
        device: Optional[Union[str, torch.device]] = None,
    ) -> None:
        super().__init__(tables, is_weighted)
        # Named like the other collections' inner module: the checkpoint signature describes the outer tables.
        self._embedding_bag_collection = MEmComEmbeddingBagCollection(row_tables, is_weighted=is_weighted, device=device)
        self._projections = nn.ModuleDict({
            name: Projection(k, d, device=device) for name, (k, d) in projections.items()
        })

    @property
    def device(self) -> torch.device:
        return self._embedding_bag_collection.device

    def reset_parameters(self) -> None:
        """Fresh rows (the inner collection's own initialisation) and projections."""
        self._embedding_bag_collection.reset_parameters()
        for p in self._projections.values():
            p.reset_parameters()
