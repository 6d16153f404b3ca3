"""``QREmbeddingBagCollection``: the quotient-remainder trick as an EmbeddingBagCollection.

Entity ``i`` of a QR table is ``Q[i // p] * R[i % p]`` (``w[i] * Q[i // p] *
R[i % p]`` with ``entity_weights``); sizes, the ratio rule and the config live
in ``qr_configs``.

A bag pools a sum of per-entity *products*, which a pooled lookup
(``EmbeddingBag``) cannot compute. The collection therefore wraps TorchRec's
unpooled ``EmbeddingCollection`` (child ``_embedding_collection``, plus one
``_embedding_collection_d<d>`` per other embedding dim) holding ``Q`` and ``R``
as ordinary tables (``<table>__q``, ``<table>__r``, fed by derived features
``<feature>__q`` = ``i // p`` and ``<feature>__r`` = ``i % p``), multiplies the
two sequence embeddings and segment-sums them per bag. ``w`` is a flat
per-entity parameter ``_entity_weights.<table>`` (``n`` scalars, initialised to
1), named and trained like MEmCom's.

This module is the unsharded reference (plain parameters, dense gradients) and
the source for export. ``DistributedModelParallel`` shards it with
``memcom_torchrec.distributed.QREmbeddingBagCollectionSharder`` (see
``distributed/qr_embeddingbag.py``) with the same parameter names; this module
knows nothing of sharding.
"""

from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from memcom_torchrec.modules.collection_base import CollectionBase
from memcom_torchrec.modules.qr_configs import (
    ENTITY_WEIGHT_INIT,
    QUOTIENT_SUFFIX,
    REMAINDER_SUFFIX,
    QREmbeddingBagConfig,
    QRFeatureSpec,
    inner_table_configs,
    qr_feature_specs,
)
from memcom_torchrec.modules.validation import validate_feature_specs


# ---------------------------------------------------------------------------
# Steps shared with the sharded twin
# ---------------------------------------------------------------------------
def qr_lookup_features(
    features: KeyedJaggedTensor,
    specs: Dict[str, QRFeatureSpec],
    group_inner_features: Dict[str, List[str]],
    carry_remainder_of: Optional[List[str]] = None,
) -> Dict[str, KeyedJaggedTensor]:
    """The KJT every inner ``EmbeddingCollection`` looks up.

    QR ids ``i`` become ``i // p`` (feature ``<f>__q``) and ``i % p`` (``<f>__r``);
    plain features keep their ids. Each child's KJT lists its features in the
    child's own order (no permute when sharded).

    Args:
        features (KeyedJaggedTensor): validated input, any key order.
        specs (Dict[str, QRFeatureSpec]): feature specs.
        group_inner_features (Dict[str, List[str]]): child -> its features.
        carry_remainder_of (Optional[List[str]]): features whose ``<f>__q`` ids
            carry ``i % p`` as their per-id weight (the sharded twin's way to
            find ``w[i]`` next to ``Q``); the other ids of the same child get
            weight 0. ``None``: no weights.

    Returns:
        Dict[str, KeyedJaggedTensor]: child name -> its KJT (same stride).
    """
    keys = features.keys()
    batch = features.stride()
    lengths = features.lengths().view(len(keys), batch)
    offsets = features.offset_per_key()
    key_index = {k: i for i, k in enumerate(keys)}
    ids = features.values().long()
    carried = set(carry_remainder_of or [])
    values: Dict[str, torch.Tensor] = {}
    bag_lengths: Dict[str, torch.Tensor] = {}
    weights: Dict[str, torch.Tensor] = {}
    for f, spec in specs.items():
        k = key_index[f]
        seg = ids[offsets[k] : offsets[k + 1]]
        if spec.is_qr:
            q = torch.div(seg, spec.num_collisions, rounding_mode="floor")
            r = seg - q * spec.num_collisions
            values[f + QUOTIENT_SUFFIX], values[f + REMAINDER_SUFFIX] = q, r
            if f in carried:
                weights[f + QUOTIENT_SUFFIX] = r.float()
        else:
            values[f] = seg
        for inner in spec.lookup_features():
            bag_lengths[inner] = lengths[k]
    out: Dict[str, KeyedJaggedTensor] = {}
    for group, inner_keys in group_inner_features.items():
        group_weights = None
        if any(g in weights for g in inner_keys):
            group_weights = torch.cat(
                [weights[g] if g in weights else torch.zeros(values[g].shape, device=ids.device) for g in inner_keys]
            )
        out[group] = KeyedJaggedTensor(
            keys=inner_keys,
            values=torch.cat([values[g] for g in inner_keys]),
            lengths=torch.cat([bag_lengths[g] for g in inner_keys]),
            weights=group_weights,
            stride=batch,
        )
    return out


def pool_qr_sequences(
    features: KeyedJaggedTensor,
    specs: Dict[str, QRFeatureSpec],
    sequences: Dict[str, torch.Tensor],
    scales: Dict[str, torch.Tensor],
) -> KeyedTensor:
    """Multiplies ``Q`` and ``R`` rows per id and pools them into ``B x d`` bags.

    Args:
        features (KeyedJaggedTensor): the input (bag lengths).
        specs (Dict[str, QRFeatureSpec]): feature specs, in output order.
        sequences (Dict[str, torch.Tensor]): inner feature -> one row per id,
            in the input's order (``<f>__q``/``<f>__r`` for QR features).
        scales (Dict[str, torch.Tensor]): feature -> a factor per id (``w[i]``
            and/or the input's own weights); features absent are not scaled.

    Returns:
        KeyedTensor: one pooled block per feature (mean pooling applied, empty bags 0).
    """
    keys = features.keys()
    batch = features.stride()
    lengths = features.lengths().view(len(keys), batch)
    key_index = {k: i for i, k in enumerate(keys)}
    # One segment sum per embedding dim.
    by_dim: Dict[int, List[str]] = {}
    for f, spec in specs.items():
        by_dim.setdefault(spec.embedding_dim, []).append(f)
    pooled: Dict[str, torch.Tensor] = {}
    for dim, feats in by_dim.items():
        per_id = []
        for f in feats:
            if specs[f].is_qr:
                emb = sequences[f + QUOTIENT_SUFFIX] * sequences[f + REMAINDER_SUFFIX]
            else:
                emb = sequences[f]
            if f in scales:
                emb = emb * scales[f].to(emb.dtype).unsqueeze(1)
            per_id.append(emb)
        flat = torch.cat(per_id)
        group_lengths = torch.stack([lengths[key_index[f]] for f in feats])  # F_g x B
        segment = torch.repeat_interleave(
            torch.arange(len(feats) * batch, device=flat.device),
            group_lengths.reshape(-1),
            output_size=flat.shape[0],
        )
        sums = torch.zeros(len(feats) * batch, dim, dtype=flat.dtype, device=flat.device).index_add(0, segment, flat)
        sums = sums.view(len(feats), batch, dim)
        for j, f in enumerate(feats):
            bag = sums[j]
            if specs[f].mean_pooling:
                bag = bag / group_lengths[j].clamp(min=1).to(bag.dtype).unsqueeze(1)
            pooled[f] = bag
    names = list(specs)
    return KeyedTensor(
        keys=names,
        length_per_key=[specs[f].embedding_dim for f in names],
        values=torch.cat([pooled[f] for f in names], dim=1),
    )


def input_weight_scales(
    features: KeyedJaggedTensor, specs: Dict[str, QRFeatureSpec], is_weighted: bool
) -> Dict[str, torch.Tensor]:
    """The input's own per-id weights, per feature (empty when not ``is_weighted``)."""
    if not is_weighted:
        return {}
    offsets = features.offset_per_key()
    weights = features.weights()
    return {k: weights[offsets[i] : offsets[i + 1]] for i, k in enumerate(features.keys()) if k in specs}


# ---------------------------------------------------------------------------
# Module
# ---------------------------------------------------------------------------
class QREmbeddingBagCollection(CollectionBase):
    """EmbeddingBagCollection whose tables may be quotient-remainder compressed.

    Entity ``i`` of a QR table is ``Q[i // p] * R[i % p]``; a bag pools
    ``sum_j c_j Q[i_j // p] * R[i_j % p]`` (``c_j`` the input's own weights if
    ``is_weighted``), divided by the bag length for MEAN pooling; empty bags
    give zeros. Plain ``EmbeddingBagConfig`` tables pool as in TorchRec.
    Parameters: ``_embedding_collection.embeddings.<table>__q.weight`` (``Q``),
    ``...<table>__r.weight`` (``R``), ``...<table>.weight`` (plain tables), and
    with ``entity_weights`` ``_entity_weights.<table>`` (``w``, ``n`` scalars;
    entity ``i`` is then ``w[i] * Q[i // p] * R[i % p]``). Tables whose
    ``embedding_dim`` differs from the first table's live in a child
    ``_embedding_collection_d<dim>`` (TorchRec's ``EmbeddingCollection`` holds a
    single dim). The sharded twin keeps every name.

    Args:
        tables (List[EmbeddingBagConfig]): QR and/or plain table configs.
        is_weighted (bool): whether input KJTs carry per-id weights.
        device (Optional[torch.device]): device, ``meta`` for lazy init.
        validate_inputs (bool): check ids before the lookup (the sharded twin
            follows this flag too).

    Example::

        ebc = QREmbeddingBagCollection(tables=[
            QREmbeddingBagConfig(name="items", num_embeddings=10_000,
                embedding_dim=64, feature_names=["history"], compression_ratio=16),
            EmbeddingBagConfig(name="users", num_embeddings=1_000,
                embedding_dim=64, feature_names=["user_id"]),
        ])
        kt = ebc(kjt)  # KeyedTensor with keys ["history", "user_id"]
    """

    def __init__(
        self,
        tables: List[EmbeddingBagConfig],
        is_weighted: bool = False,
        device: Optional[Union[str, torch.device]] = None,
        validate_inputs: bool = True,
    ) -> None:
        super().__init__(tables, is_weighted)
        names = [t.name for t in tables]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate table names {names}")
        self._validate_inputs = validate_inputs
        self._device: torch.device = torch.device(device) if device is not None else torch.device("cpu")
        self._feature_specs: Dict[str, QRFeatureSpec] = qr_feature_specs(tables)
        groups = inner_table_configs(tables)
        self._group_names: List[str] = list(groups)
        for name, configs in groups.items():
            self.add_module(name, EmbeddingCollection(tables=configs, device=self._device))
        self._group_inner_features: Dict[str, List[str]] = {
            g: [f for c in configs for f in c.feature_names] for g, configs in groups.items()
        }
        self._entity_weights = nn.ParameterDict()
        for t in tables:
            if isinstance(t, QREmbeddingBagConfig) and t.entity_weights:
                self._entity_weights[t.name] = nn.Parameter(torch.empty(t.num_embeddings, device=self._device))
        self._reset_entity_weights()

    # ------------------------------------------------------------------ API
    @property
    def device(self) -> torch.device:
        return self._device

    def feature_specs(self) -> Dict[str, QRFeatureSpec]:
        """Returns: per-feature lookup specs, in output order."""
        return self._feature_specs

    def group_inner_features(self) -> Dict[str, List[str]]:
        """Returns: inner ``EmbeddingCollection`` child -> the features it looks up, in its order."""
        return self._group_inner_features

    def reset_parameters(self) -> None:
        """Re-initialises ``Q`` and plain tables (``init_fn``), sets ``R`` to ``remainder_init`` and ``w`` to 1."""
        if self._device.type == "meta":
            return
        for name in self._group_names:
            getattr(self, name).reset_parameters()
        self._reset_entity_weights()

    def _reset_entity_weights(self) -> None:
        if self._device.type == "meta":
            return
        with torch.no_grad():
            for w in self._entity_weights.values():
                w.fill_(ENTITY_WEIGHT_INIT)

    def qr_parameters(self, table_name: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """The two tables of a QR table.

        Args:
            table_name (str): a QR table.

        Returns:
            Tuple[torch.Tensor, torch.Tensor]: ``Q`` (``ceil(n/p) x d``) and
            ``R`` (``p x d``); entity ``i`` is ``Q[i // p] * R[i % p]``.

        Raises:
            KeyError: not a QR table of this collection.
        """
        config = next((t for t in self._embedding_bag_configs if t.name == table_name), None)
        if not isinstance(config, QREmbeddingBagConfig):
            raise KeyError(f"'{table_name}' is not a QR table of this collection")
        child = getattr(self, self._feature_specs[config.feature_names[0]].group)
        return (
            child.embeddings[table_name + QUOTIENT_SUFFIX].weight,
            child.embeddings[table_name + REMAINDER_SUFFIX].weight,
        )

    def entity_weights(self, table_name: str) -> nn.Parameter:
        """The per-entity weights ``w`` of a QR table built with ``entity_weights``.

        Args:
            table_name (str): a QR table with ``entity_weights``.

        Returns:
            nn.Parameter: ``w`` (``n`` values; ``w[i]`` scales entity ``i``).

        Raises:
            KeyError: not a QR table with per-entity weights.
        """
        if table_name not in self._entity_weights:
            raise KeyError(f"'{table_name}' is not a QR table with entity_weights in this collection")
        return self._entity_weights[table_name]

    def dense_tables(self, table_name: str) -> Dict[str, torch.Tensor]:
        """Every tensor of one table by role, as an exporter needs them.

        Args:
            table_name (str): any table of this collection.

        Returns:
            Dict[str, torch.Tensor]: ``{"Q", "R"}`` (QR: entity ``i`` is
            ``Q[i // p] * R[i % p]``), ``{"Q", "R", "w"}`` (``memcom_qr``:
            times ``w[i]``) or ``{"weight"}`` (a plain ``n x d`` table).

        Raises:
            KeyError: no such table.
        """
        config = next((t for t in self._embedding_bag_configs if t.name == table_name), None)
        if config is None:
            raise KeyError(f"no table '{table_name}' in this collection")
        if not isinstance(config, QREmbeddingBagConfig):
            child = getattr(self, self._feature_specs[config.feature_names[0]].group)
            return {"weight": child.embeddings[table_name].weight}
        Q, R = self.qr_parameters(table_name)
        if table_name in self._entity_weights:
            return {"Q": Q, "R": R, "w": self._entity_weights[table_name]}
        return {"Q": Q, "R": R}

    # -------------------------------------------------------------- forward
    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pools the embeddings of every feature.

        Args:
            features (KeyedJaggedTensor): ids (and weights if ``is_weighted``) of
                every feature of the collection.

        Returns:
            KeyedTensor: one pooled ``B x d`` block per feature, in table order.

        Raises:
            ValueError: on unknown/missing keys, ids out of range, bad dtypes.
        """
        if self._validate_inputs:
            error = validate_feature_specs(features, self._feature_specs, self._is_weighted)
            if error is not None:
                raise ValueError(error)
        if features.stride() == 0:  # TorchRec's EmbeddingCollection cannot split an empty batch
            return self._empty_output()
        inner = qr_lookup_features(features, self._feature_specs, self._group_inner_features)
        sequences: Dict[str, torch.Tensor] = {}
        for group, kjt in inner.items():
            sequences.update({k: jt.values() for k, jt in getattr(self, group)(kjt).items()})
        return pool_qr_sequences(features, self._feature_specs, sequences, self._scales(features))

    def _scales(self, features: KeyedJaggedTensor) -> Dict[str, torch.Tensor]:
        """Per-id factors: ``w[i]`` times the input's own weight."""
        scales = input_weight_scales(features, self._feature_specs, self._is_weighted)
        offsets = features.offset_per_key()
        ids = features.values()
        for k, f in enumerate(features.keys()):
            spec = self._feature_specs[f]
            if spec.has_entity_weights:
                w = self._entity_weights[spec.table][ids[offsets[k] : offsets[k + 1]].long()]
                scales[f] = w if f not in scales else w * scales[f].to(w.dtype)
        return scales

    def _empty_output(self) -> KeyedTensor:
        """``0 x sum(d)`` output, connected to the tables for autograd."""
        blocks = []
        for spec in self._feature_specs.values():
            table = spec.table + QUOTIENT_SUFFIX if spec.is_qr else spec.table
            blocks.append(getattr(self, spec.group).embeddings[table].weight[:0].float())
        return KeyedTensor(
            keys=list(self._feature_specs),
            length_per_key=[s.embedding_dim for s in self._feature_specs.values()],
            values=torch.cat(blocks, 1),
        )
