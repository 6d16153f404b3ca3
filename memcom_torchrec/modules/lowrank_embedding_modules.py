"""LowRankEmbeddingBagCollection: low-rank and plain tables, KeyedJaggedTensor in, KeyedTensor out.

Entity ``i`` of a low-rank table is ``P A[i]`` (``modules/lowrank_configs.py``). The rows of
every table (``A``, and plain tables) live in an inner ``MEmComEmbeddingBagCollection`` of
plain tables, which FBGEMM looks up and updates with its fused optimizer; the collection
pools ``A``'s rows per bag and projects the pooled ``k``-vector with ``P`` (an ``nn.Linear``
without bias, shared by the table's features).

Sharded twin: ``DistributedModelParallel`` shards the inner collection with MEmCom's sharder
(table-wise or row-wise, on GPUs and on CPU) and keeps ``P`` as a dense layer, replicated and
data-parallel like the model's MLP (its gradient is averaged over ranks by DDP, as every
dense layer's). So the sharded model is this module with a sharded child: parameter names
and the export are the same either way.
"""

from typing import Dict, List, Optional, Union

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from memcom_torchrec.modules.lowrank_configs import LowRankEmbeddingBagConfig
from memcom_torchrec.modules.projected_collection import ProjectedCollection


def inner_table_config(config: EmbeddingBagConfig) -> EmbeddingBagConfig:
    """The plain table holding a config's rows: ``A`` (``n x k``) for a low-rank table, else the table itself."""
    if not isinstance(config, LowRankEmbeddingBagConfig):
        return config
    return EmbeddingBagConfig(
        name=config.name, num_embeddings=config.num_embeddings, embedding_dim=config.rank,
        feature_names=list(config.feature_names), pooling=config.pooling, data_type=config.data_type,
    )


class LowRankEmbeddingBagCollection(ProjectedCollection):
    """EmbeddingBagCollection whose tables may be low-rank (``P A[i]``); plain tables behave as in TorchRec.

    Parameters: ``_embedding_bag_collection._embedding_bag_collection.embedding_bags.<table>.weight``
    (``A``, or a plain table) and ``_projections.<table>.weight`` (``P``, ``d x k``).

    Args:
        tables (List[EmbeddingBagConfig]): low-rank and/or plain table configs.
        is_weighted (bool): whether input KJTs carry per-id weights.
        device (Optional[torch.device]): device, ``meta`` for lazy init.

    Example::

        ebc = LowRankEmbeddingBagCollection(tables=[
            LowRankEmbeddingBagConfig(name="items", num_embeddings=3706, embedding_dim=64,
                                      feature_names=["history"], compression_ratio=4.0),
        ])
        kt = ebc(kjt)  # KeyedTensor with key "history", width 64
    """

    def __init__(
        self,
        tables: List[EmbeddingBagConfig],
        is_weighted: bool = False,
        device: Optional[Union[str, torch.device]] = None,
    ) -> None:
        super().__init__(
            tables, is_weighted,
            row_tables=[inner_table_config(t) for t in tables],
            projections={t.name: (t.rank, t.embedding_dim) for t in tables
                         if isinstance(t, LowRankEmbeddingBagConfig)},
            device=device,
        )
        table_of = {f: t.name for t in tables for f in t.feature_names}
        rows = self._embedding_bag_collection._embedding_bag_collection  # TorchRec's EBC: the output key order
        self._keys: List[str] = list(rows._embedding_names)
        self._key_tables: List[str] = [table_of[k] for k in self._keys]
        dims = {t.name: t.embedding_dim for t in tables}
        self._dims: List[int] = [dims[table_of[k]] for k in self._keys]

    def dense_tables(self, table_name: str) -> Dict[str, torch.Tensor]:
        """Every tensor of one table by role, as an exporter needs them.

        Returns:
            Dict[str, torch.Tensor]: ``{"A", "P"}`` (entity ``i`` is ``P A[i]``, ``P`` of shape ``d x k``)
            or ``{"weight"}`` (a plain ``n x d`` table).

        Raises:
            KeyError: no such table.
        """
        rows = self._embedding_bag_collection.dense_tables(table_name)["weight"]
        if table_name not in self._projections:
            return {"weight": rows}
        return {"A": rows, "P": self._projections[table_name].weight}

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pools every feature: ``P`` times the pooled rows of ``A`` for a low-rank table.

        Args:
            features (KeyedJaggedTensor): ids (and weights if ``is_weighted``) of every feature.

        Returns:
            KeyedTensor: one ``d``-wide pooled embedding per feature (TorchRec's key order: by table, then feature).
        """
        # Static keys and widths (no iteration over the output): TorchRec's pipelines trace this forward.
        pooled = self._embedding_bag_collection(features).to_dict()
        out = [
            self._projections[table](pooled[key]) if table in self._projections else pooled[key]
            for key, table in zip(self._keys, self._key_tables)
        ]
        return KeyedTensor(keys=self._keys, length_per_key=self._dims, values=torch.cat(out, dim=1))
