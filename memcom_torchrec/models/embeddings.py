"""A model's embedding tables under one embedding method, chosen by config.

The methods themselves (uncompressed, hashing, memcom, qr, memcom_qr, ...) are
defined once in ``memcom_torchrec.modules.methods``; this module applies one of
them to a model's logical tables and builds the collection that stores them.
"""

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Union

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from memcom_torchrec.modules.methods import UNCOMPRESSED, TableSpec, collection_class_for, get_method

__all__ = ["EmbeddingMethodConfig", "TableSpec", "build_collection", "table_configs"]


@dataclass
class EmbeddingMethodConfig:
    """How a model's tables are stored.

    Args:
        method (str): a registered method (``modules.methods.method_names()``).
        compression_ratio (float): target ratio of each compressed table.
        compressed_tables (Sequence[str]): tables the method applies to; the
            others stay uncompressed.
        embedding_dim (int): ``d`` of every table.
    """

    method: str = "uncompressed"
    compression_ratio: float = 1.0
    compressed_tables: Sequence[str] = field(default_factory=lambda: ("item",))
    embedding_dim: int = 64

    def __post_init__(self) -> None:
        method = get_method(self.method)  # raises on an unknown name
        if method.compresses and self.compression_ratio <= 1.0:
            raise ValueError(f"method '{self.method}' needs compression_ratio > 1, got {self.compression_ratio}")


def table_configs(specs: List[TableSpec], cfg: EmbeddingMethodConfig) -> List[EmbeddingBagConfig]:
    """Table configs of ``specs`` under the method ``cfg``.

    Raises:
        ValueError: a compressed table cannot reach the ratio (naming the table and the method's maximum).
    """
    method = get_method(cfg.method)
    return [
        (method if s.name in cfg.compressed_tables else UNCOMPRESSED).table_config(
            s, cfg.embedding_dim, cfg.compression_ratio
        )
        for s in specs
    ]


def build_collection(
    tables: List[EmbeddingBagConfig], device: Optional[Union[str, torch.device]] = None
) -> nn.Module:
    """The collection module storing ``tables``: the registry's collection of their method.

    Returns:
        nn.Module: TorchRec's EmbeddingBagCollection if every table is plain,
        else the MEmCom or QR collection.
    """
    return collection_class_for(tables)(tables=tables, device=device)
