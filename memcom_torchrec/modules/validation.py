"""Input checks shared by the unsharded and sharded MEmCom collections.

Everything here runs before any FBGEMM kernel sees the ids, so bad input
raises a ``ValueError`` naming the feature and the offending value instead of
crashing (or silently reading the wrong row) inside C++.
"""

from typing import Any, Dict, List, Mapping, Optional

import torch
import torch.distributed as dist
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


def check_table_config(config: EmbeddingBagConfig, kind: str) -> str:
    """Checks what every compressed table config needs (name, sizes, features, pooling).

    Args:
        config (EmbeddingBagConfig): the config.
        kind (str): its kind for messages, e.g. ``"MEmCom"``.

    Returns:
        str: the ``"<kind> table '<name>'"`` prefix for further messages.

    Raises:
        ValueError: naming the table and the bad field.
    """
    where = f"{kind} table '{config.name}'"
    if not config.name:
        raise ValueError(f"{kind} table needs a name")
    if config.num_embeddings <= 0:
        raise ValueError(f"{where}: num_embeddings must be > 0, got {config.num_embeddings}")
    if config.embedding_dim <= 0 or config.embedding_dim % 4 != 0:
        raise ValueError(
            f"{where}: embedding_dim must be a positive multiple of 4 (FBGEMM TBE), got {config.embedding_dim}"
        )
    if not config.feature_names:
        raise ValueError(f"{where}: feature_names is empty")
    if len(set(config.feature_names)) != len(config.feature_names):
        raise ValueError(f"{where}: duplicate feature names {config.feature_names}")
    if config.pooling not in (PoolingType.SUM, PoolingType.MEAN):
        raise ValueError(f"{where}: pooling must be SUM or MEAN, got {config.pooling}")
    return where


def raise_on_any_rank(
    error: Optional[str],
    pg: Optional[dist.ProcessGroup],
    device: torch.device,
    batch_size: Optional[int] = None,
) -> None:
    """Raises ``ValueError(error)`` on every rank if any rank has an error.

    A bad batch on one rank must not leave the others waiting in the next
    all-to-all: the ranks agree (one tiny all-reduce) before any collective.
    The rank with the bad input raises its own message, the others
    ``bad input on rank r: ...``.

    Args:
        error (Optional[str]): this rank's validation error, or None.
        pg (Optional[dist.ProcessGroup]): the sharded module's group (None: local only).
        device (torch.device): device for the flag (CUDA for NCCL).
        batch_size (Optional[int]): if given, every rank must have this same
            batch size (TorchRec's row-wise output dist needs it).
    """
    if pg is None or dist.get_world_size(pg) == 1:
        if error is not None:
            raise ValueError(error)
        return
    b = -1 if batch_size is None else batch_size
    flag = torch.tensor([0 if error is None else 1, b, -b], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=pg)
    if int(flag[0]) == 0:
        if batch_size is not None and int(flag[1]) != -int(flag[2]):
            raise ValueError(
                f"batch sizes differ across ranks ({-int(flag[2])} to {int(flag[1])}; this rank {batch_size}): "
                "row-wise sharded tables need equal batch sizes on every rank; pad the trailing batches "
                "(memcom_torchrec.data.pad_batch)"
            )
        return
    messages: List[Optional[str]] = [None] * dist.get_world_size(pg)
    dist.all_gather_object(messages, error, group=pg)
    if error is not None:
        raise ValueError(error)
    first = next(i for i, m in enumerate(messages) if m is not None)
    raise ValueError(f"bad input on rank {first}: {messages[first]}")


def validate_features(
    features: KeyedJaggedTensor,
    num_embeddings_per_feature: Dict[str, int],
    table_per_feature: Dict[str, str],
    is_weighted: bool,
) -> Optional[str]:
    """Checks a KJT against the collection's features.

    Args:
        features (KeyedJaggedTensor): the input.
        num_embeddings_per_feature (Dict[str, int]): valid id range ``[0, n)``
            of every expected feature.
        table_per_feature (Dict[str, str]): table of every feature, for messages.
        is_weighted (bool): whether the collection expects per-id weights.

    Returns:
        Optional[str]: ``None`` if the input is valid, else an error message
        naming the feature and the bad value (the sharded module needs the
        message before it raises, to tell the other ranks).
    """
    if not isinstance(features, KeyedJaggedTensor):
        return f"expected a KeyedJaggedTensor, got {type(features).__name__}"
    keys: List[str] = features.keys()
    expected = set(num_embeddings_per_feature)
    unknown = [k for k in keys if k not in expected]
    if unknown:
        return f"unknown feature key(s) {unknown}; this collection has features {sorted(expected)}"
    missing = [k for k in num_embeddings_per_feature if k not in keys]
    if missing:
        return f"missing feature key(s) {missing} in the input KeyedJaggedTensor (keys {keys})"
    if len(set(keys)) != len(keys):
        return f"duplicate feature keys in the input: {keys}"
    if features.variable_stride_per_key():
        return "variable batch size per feature (VBE) KeyedJaggedTensors are not supported"
    values = features.values()
    if values.dtype not in (torch.int32, torch.int64):
        return (
            f"feature '{keys[0]}': ids must be int32 or int64, got {values.dtype}"
            if keys
            else f"ids must be int32 or int64, got {values.dtype}"
        )
    lengths = features.lengths()
    if lengths.numel() and int(lengths.min()) < 0:
        per_key = lengths.view(len(keys), -1) if keys else lengths.view(0, 0)
        bad = int((per_key < 0).any(dim=1).nonzero()[0])
        return f"feature '{keys[bad]}': negative bag length {int(per_key[bad].min())}"
    weights = features.weights_or_none()
    if is_weighted and weights is None:
        return "this collection is weighted (is_weighted=True) but the input has no weights"
    if not is_weighted and weights is not None:
        return "the input carries weights but the collection was built with is_weighted=False"
    if weights is not None and not weights.is_floating_point():
        return f"weights must be floating point, got {weights.dtype}"
    if values.numel() == 0:
        return None
    length_per_key = features.length_per_key()
    bounds = torch.tensor(
        [num_embeddings_per_feature[k] for k in keys], dtype=values.dtype, device=values.device
    )
    upper = torch.repeat_interleave(
        bounds, torch.tensor(length_per_key, device=values.device), output_size=values.numel()
    )
    bad_mask = (values < 0) | (values >= upper)
    if bool(bad_mask.any()):
        pos = int(bad_mask.nonzero()[0])
        offsets = features.offset_per_key()
        k = next(j for j in range(len(keys)) if offsets[j] <= pos < offsets[j + 1])
        value = int(values[pos])
        feature = keys[k]
        if value < 0:
            return (
                f"feature '{feature}': negative id {value} for table "
                f"'{table_per_feature[feature]}'"
            )
        return (
            f"feature '{feature}': id {value} is out of range for table "
            f"'{table_per_feature[feature]}' (num_embeddings={num_embeddings_per_feature[feature]})"
        )
    return None


def validate_feature_specs(features: KeyedJaggedTensor, specs: Mapping[str, Any], is_weighted: bool) -> Optional[str]:
    """``validate_features`` against a collection's feature specs (each with ``num_embeddings`` and ``table``).

    Returns:
        Optional[str]: ``None`` if valid, else the error message.
    """
    return validate_features(
        features,
        {f: s.num_embeddings for f, s in specs.items()},
        {f: s.table for f, s in specs.items()},
        is_weighted,
    )
