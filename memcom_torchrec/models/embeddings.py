"""Which embedding method a model's tables use, chosen by config.

Methods (every one a KJT -> KeyedTensor collection on FBGEMM fused kernels
once sharded):

- ``uncompressed``: TorchRec's own EmbeddingBagCollection;
- ``hashing``: the hashing trick, ``U[i mod m]`` (MEmCom with ``w`` frozen, none stored);
- ``memcom``: ``w[i] * U[i mod m]``;
- ``qr``: quotient-remainder, ``Q[i // p] * R[i mod p]`` (element-wise);
- ``memcom_qr`` (a variant beyond the paper): ``w[i] * Q[i // p] * R[i mod p]``, MEmCom's
  per-entity scalar on top of a quotient-remainder pair (``n`` scalars counted in the ratio);
- ``memcom_double`` (a variant beyond the paper): ``w[i] * U[i mod m1] + V[i mod m2]``, a MEmCom
  table plus a hashing-trick table of coprime size ``m2 = m1 - 1``. Two entities share both rows
  only if ``i = j mod m1*m2``: with ``m1*m2 > n`` every entity gets its own pair of rows, for the
  memory of one MEmCom table (``m1 + m2`` rows and ``n`` scalars at the target ratio). The second
  table reads a copy of each feature named ``<feature>2`` (``duplicate_features``).
"""

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torchrec import EmbeddingBagCollection
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from memcom_torchrec.modules.memcom_configs import MEmComEmbeddingBagConfig
from memcom_torchrec.modules.memcom_embedding_modules import MEmComEmbeddingBagCollection

METHODS = ("uncompressed", "hashing", "memcom", "qr", "memcom_double", "memcom_qr")
SECOND_TABLE_SUFFIX = "2"


def double_hashing_buckets(num_embeddings: int, embedding_dim: int, ratio: float) -> Tuple[int, int]:
    """Rows ``(m1, m2 = m1 - 1)`` of ``memcom_double`` whose ratio ``n*d / ((m1+m2)*d + n)`` is >= ``ratio``.

    Args:
        num_embeddings (int): ``n``.
        embedding_dim (int): ``d``.
        ratio (float): target compression ratio (``1 < ratio < d``).

    Returns:
        Tuple[int, int]: ``(m1, m2)``, consecutive (hence coprime) integers.
    """
    if not 1.0 < ratio < embedding_dim:
        raise ValueError(f"memcom_double: compression_ratio must be in (1, {embedding_dim}), got {ratio}")
    rows = (num_embeddings * embedding_dim / ratio - num_embeddings) // embedding_dim
    m1 = max(2, int(rows + 1) // 2)
    return m1, m1 - 1


def duplicate_features(features: KeyedJaggedTensor, names: Sequence[str]) -> KeyedJaggedTensor:
    """Appends a copy of each feature in ``names`` as ``<name>2`` (the second table's input)."""
    d = features.to_dict()
    keys = list(features.keys()) + [n + SECOND_TABLE_SUFFIX for n in names]
    jts = [d[k] for k in features.keys()] + [d[n] for n in names]
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys,
        values=torch.cat([jt.values() for jt in jts]),
        lengths=torch.cat([jt.lengths() for jt in jts]),
        stride=features.stride(),
    )


@dataclass
class TableSpec:
    """One logical table of a model before compression.

    Args:
        name (str): table name.
        num_embeddings (int): entities.
        feature_names (List[str]): features looked up in it.
        pooling (PoolingType): bag pooling.
    """

    name: str
    num_embeddings: int
    feature_names: List[str]
    pooling: PoolingType = PoolingType.SUM


@dataclass
class EmbeddingMethodConfig:
    """How a model's tables are stored.

    Args:
        method (str): one of ``METHODS``.
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
        if self.method not in METHODS:
            raise ValueError(f"unknown embedding method '{self.method}'; choose one of {list(METHODS)}")
        if self.method != "uncompressed" and self.compression_ratio <= 1.0:
            raise ValueError(f"method '{self.method}' needs compression_ratio > 1, got {self.compression_ratio}")


def table_configs(specs: List[TableSpec], cfg: EmbeddingMethodConfig) -> List[EmbeddingBagConfig]:
    """Table configs of ``specs`` under the method ``cfg``."""
    out: List[EmbeddingBagConfig] = []
    for s in specs:
        common = dict(
            name=s.name,
            num_embeddings=s.num_embeddings,
            embedding_dim=cfg.embedding_dim,
            feature_names=list(s.feature_names),
            pooling=s.pooling,
        )
        compressed = cfg.method != "uncompressed" and s.name in cfg.compressed_tables
        if not compressed:
            out.append(EmbeddingBagConfig(**common))
        elif cfg.method == "memcom":
            out.append(MEmComEmbeddingBagConfig(compression_ratio=cfg.compression_ratio, **common))
        elif cfg.method == "hashing":
            out.append(
                MEmComEmbeddingBagConfig(compression_ratio=cfg.compression_ratio, train_entity_weights=False, **common)
            )
        elif cfg.method in ("qr", "memcom_qr"):
            from memcom_torchrec.modules.qr_embedding_modules import QREmbeddingBagConfig

            out.append(QREmbeddingBagConfig(
                compression_ratio=cfg.compression_ratio, entity_weights=cfg.method == "memcom_qr", **common
            ))
        elif cfg.method == "memcom_double":
            m1, m2 = double_hashing_buckets(s.num_embeddings, cfg.embedding_dim, cfg.compression_ratio)
            out.append(MEmComEmbeddingBagConfig(num_buckets=m1, **common))
            second = dict(common, name=s.name + SECOND_TABLE_SUFFIX,
                          feature_names=[f + SECOND_TABLE_SUFFIX for f in s.feature_names])
            out.append(MEmComEmbeddingBagConfig(num_buckets=m2, train_entity_weights=False, **second))
    return out


def build_collection(
    tables: List[EmbeddingBagConfig], device: Optional[Union[str, torch.device]] = None
) -> nn.Module:
    """The collection module for a list of table configs.

    Returns:
        nn.Module: TorchRec's EmbeddingBagCollection if every table is plain,
        else the MEmCom or QR collection.
    """
    if any(type(t).__name__ == "QREmbeddingBagConfig" for t in tables):
        from memcom_torchrec.modules.qr_embedding_modules import QREmbeddingBagCollection

        return QREmbeddingBagCollection(tables=tables, device=device)
    if any(isinstance(t, MEmComEmbeddingBagConfig) for t in tables):
        return MEmComEmbeddingBagCollection(tables=tables, device=device)
    return EmbeddingBagCollection(tables=tables, device=device)
