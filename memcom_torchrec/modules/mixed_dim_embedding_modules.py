"""MixedDimEmbeddingBagCollection: mixed-dimension and plain tables, KeyedJaggedTensor in, KeyedTensor out.

Entity ``i`` of a mixed-dimension table (``modules/mixed_dim_configs.py``) is ``head[s]`` if its
slot ``s = slots[i]`` is below ``h``, else ``P tail[s - h]``. The head and tail rows (and plain
tables) live in an inner ``MEmComEmbeddingBagCollection`` of plain tables that FBGEMM looks up
and updates; each input feature ``f`` of a mixed table is split into ``f__head`` and ``f__tail``
(the ids' slots, by block, in bag order), both sum-pooled, and the feature's embedding is
``head_sum + P tail_sum`` (divided by the bag length for MEAN pooling): ``P`` commutes with the sum.

Sharded twin: ``DistributedModelParallel`` shards the inner collection with MEmCom's sharder (TW or
RW) and keeps ``P`` as a dense layer; each rank splits its own batch before the inner input
all-to-all. TorchRec's sparse-dist pipeline cannot start that all-to-all a batch early (its input
is computed here), so the trainer runs such models with the plain pipeline (``remaps_input``).
"""

import math
from typing import Dict, List, Optional, Union

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from memcom_torchrec.modules.memcom_configs import assignment_dtype
from memcom_torchrec.modules.mixed_dim_configs import MixedDimEmbeddingBagConfig
from memcom_torchrec.modules.projected_collection import ProjectedCollection
from memcom_torchrec.modules.validation import InputCheck, raise_on_any_rank

HEAD, TAIL = "__head", "__tail"


def inner_table_configs(config: EmbeddingBagConfig) -> List[EmbeddingBagConfig]:
    """The plain tables holding a config's rows: its head and tail (sum-pooled), or the table itself.

    Both blocks start as a plain ``n``-row table would (uniform ``+-sqrt(1/n)``), the tail's projection
    keeping that scale (``Projection``).
    """
    if not isinstance(config, MixedDimEmbeddingBagConfig):
        return [config]
    bound = math.sqrt(1.0 / config.num_embeddings)
    common = dict(pooling=PoolingType.SUM, data_type=config.data_type, weight_init_min=-bound, weight_init_max=bound)
    return [
        EmbeddingBagConfig(name=config.name + HEAD, num_embeddings=config.head_rows,
                           embedding_dim=config.embedding_dim, feature_names=[f + HEAD for f in config.feature_names],
                           **common),
        EmbeddingBagConfig(name=config.name + TAIL, num_embeddings=config.num_embeddings - config.head_rows,
                           embedding_dim=config.tail_dim, feature_names=[f + TAIL for f in config.feature_names],
                           **common),
    ]


class MixedDimEmbeddingBagCollection(ProjectedCollection):
    """EmbeddingBagCollection whose tables may be mixed-dimension; plain tables behave as in TorchRec.

    Parameters: ``_embedding_bag_collection._embedding_bag_collection.embedding_bags.<table>__head.weight``,
    ``...<table>__tail.weight``, ``_projections.<table>.weight`` (``P``, ``d x t``) and the buffer
    ``_slots.<table>`` (entity -> slot).

    Args:
        tables (List[EmbeddingBagConfig]): mixed-dimension and/or plain table configs.
        is_weighted (bool): must be False (per-id weights are not supported).
        device (Optional[torch.device]): device, ``meta`` for lazy init.
    """

    # The trainer's signal to run the plain pipeline (the inner collection's input is computed here).
    remaps_input: bool = True

    def __init__(
        self,
        tables: List[EmbeddingBagConfig],
        is_weighted: bool = False,
        device: Optional[Union[str, torch.device]] = None,
    ) -> None:
        if is_weighted:
            raise ValueError("MixedDimEmbeddingBagCollection does not take per-id weights (is_weighted=True)")
        mixed = [t for t in tables if isinstance(t, MixedDimEmbeddingBagConfig)]
        super().__init__(
            tables, is_weighted,
            row_tables=[c for t in tables for c in inner_table_configs(t)],
            projections={t.name: (t.tail_dim, t.embedding_dim) for t in mixed},
            device=device,
        )
        self._mixed: Dict[str, MixedDimEmbeddingBagConfig] = {t.name: t for t in mixed}
        self._slots = nn.Module()
        for t in mixed:
            self._slots.register_buffer(
                t.name, torch.arange(t.num_embeddings, device=device).to(assignment_dtype(t.num_embeddings)))
        self._table_of: Dict[str, EmbeddingBagConfig] = {f: t for t in tables for f in t.feature_names}
        self._keys: List[str] = [f for t in tables for f in t.feature_names]

    def reset_parameters(self) -> None:
        """Fresh tables and projections; every entity's slot is its id until ``set_assignment``."""
        super().reset_parameters()
        with torch.no_grad():
            for name, slots in self._slots.named_buffers():
                slots.copy_(torch.arange(slots.numel(), device=slots.device).to(slots.dtype))

    def set_assignment(self, table_name: str, slots: torch.Tensor) -> None:
        """Sets a table's entity -> slot map (a permutation of ``[0, n)``: slots below ``h`` are the head).

        Raises:
            ValueError: not a mixed-dimension table, or ``slots`` is not a permutation of ``[0, n)``.
        """
        if table_name not in self._mixed:
            raise ValueError(f"table '{table_name}' is not a mixed-dimension table")
        n = self._mixed[table_name].num_embeddings
        slots = slots.detach().long().cpu()
        if slots.shape != (n,):
            raise ValueError(f"table '{table_name}': slots must be a permutation of [0, {n}), got shape "
                             f"{tuple(slots.shape)}")
        if not torch.equal(torch.sort(slots).values, torch.arange(n)):
            raise ValueError(f"table '{table_name}': slots must be a permutation of [0, {n}) (some slot is "
                             "repeated or out of range)")
        buffer = getattr(self._slots, table_name)
        buffer.copy_(slots.to(buffer.dtype))

    def assignment(self, table_name: str) -> torch.Tensor:
        """A table's entity -> slot map."""
        return getattr(self._slots, table_name)

    def dense_tables(self, table_name: str) -> Dict[str, torch.Tensor]:
        """Every tensor of one table by role, as an exporter needs them.

        Returns:
            Dict[str, torch.Tensor]: ``{"head", "tail", "P", "slots"}`` for a mixed-dimension table
            (see the module docstring), or ``{"weight"}`` (a plain ``n x d`` table).

        Raises:
            KeyError: no such table.
        """
        inner = self._embedding_bag_collection
        if table_name not in self._mixed:
            return inner.dense_tables(table_name)
        return {
            "head": inner.dense_tables(table_name + HEAD)["weight"],
            "tail": inner.dense_tables(table_name + TAIL)["weight"],
            "P": self._projections[table_name].weight,
            "slots": getattr(self._slots, table_name),
        }

    def _check(self, features: KeyedJaggedTensor) -> None:
        """Raises on unknown keys or ids out of range, on every rank if the inner collection is sharded.

        The mixed features' ids are read here, before the inner collection checks its own
        input: a bad id on one rank must not leave the others waiting in its all-to-all.
        """
        unknown = [k for k in features.keys() if k not in self._table_of]
        bad = torch.zeros((), dtype=torch.long, device=features.values().device)
        parts = features.to_dict() if not unknown else {}
        for key, jt in parts.items():
            table = self._table_of[key]
            if table.name in self._mixed:
                ids = jt.values()
                bad = bad + ((ids < 0) | (ids >= table.num_embeddings)).sum()

        def describe() -> Optional[str]:  # worded as the other collections' checks
            for key, jt in parts.items():
                table, ids = self._table_of[key], jt.values()
                wrong = ids[(ids < 0) | (ids >= table.num_embeddings)] if table.name in self._mixed else ids[:0]
                if wrong.numel():
                    v = int(wrong[0])
                    return (f"feature '{key}': negative id {v} for table '{table.name}'" if v < 0 else
                            f"feature '{key}': id {v} is out of range for table '{table.name}' "
                            f"(num_embeddings={table.num_embeddings})")
            return None

        error = f"unknown feature(s) {unknown}; this collection has {self._keys}" if unknown else None
        inner = self._embedding_bag_collection
        pg = getattr(inner, "_pg", None)  # the sharded inner collection's process group (None: unsharded)
        raise_on_any_rank(InputCheck(error, bad, describe), pg, features.values().device)

    def _split(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """Each mixed feature's ids as slots, split into its head and tail features (bag order kept)."""
        self._check(features)
        keys, values, lengths = [], [], []
        for key, jt in features.to_dict().items():
            table = self._table_of[key]
            ids, lens = jt.values(), jt.lengths()
            if table.name not in self._mixed:
                keys.append(key)
                values.append(ids)
                lengths.append(lens)
                continue
            h = table.head_rows
            slot = getattr(self._slots, table.name).index_select(0, ids.long()).long()
            head = slot < h
            bag = torch.repeat_interleave(torch.arange(lens.numel(), device=ids.device), lens.long())
            head_lens = torch.zeros_like(lens).index_add(0, bag, head.to(lens.dtype))
            keys += [key + HEAD, key + TAIL]
            values += [slot[head], slot[~head] - h]
            lengths += [head_lens, lens - head_lens]
        return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths))

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pools every feature (see the module docstring).

        Args:
            features (KeyedJaggedTensor): ids of every feature of the collection.

        Returns:
            KeyedTensor: one ``d``-wide pooled embedding per feature, in table order.

        Raises:
            ValueError: unknown keys, ids out of range (and what the inner collection refuses).
        """
        pooled = self._embedding_bag_collection(self._split(features)).to_dict()
        lengths = {k: jt.lengths() for k, jt in features.to_dict().items()}
        out, dims = [], []
        for key in self._keys:
            table = self._table_of[key]
            dims.append(table.embedding_dim)
            if table.name not in self._mixed:
                out.append(pooled[key])
                continue
            v = pooled[key + HEAD] + self._projections[table.name](pooled[key + TAIL])
            if table.pooling == PoolingType.MEAN:
                v = v / lengths[key].clamp(min=1).unsqueeze(1).to(v.dtype)
            out.append(v)
        return KeyedTensor(keys=self._keys, length_per_key=dims, values=torch.cat(out, dim=1))
