"""Input checks shared by the unsharded and sharded MEmCom collections.

Everything here runs before any FBGEMM kernel sees the ids, so bad input
raises a ``ValueError`` naming the feature and the offending value instead of
crashing (or silently reading the wrong row) inside C++.
"""

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional

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


@dataclass
class InputCheck:
    """One batch's validation: what the host knows now, and the device-side value checks.

    Structural problems (keys, dtypes, weights, bag-length totals) are known
    from the KJT's host metadata. Per-value problems (negative bag lengths,
    ids out of range) are counted on the device into ``bad_values`` without a
    host read, so the step reads at most one flag (``resolve`` or
    ``raise_on_any_rank``); only a flagged batch pays for ``describe``.

    Args:
        error (Optional[str]): a structural error, or None.
        bad_values (Optional[torch.Tensor]): 0-d int64 count of bad lengths
            and ids (None: nothing to check).
        describe (Callable[[], Optional[str]]): the message naming the feature
            and the bad value (reads values back; called only on error).
    """

    error: Optional[str] = None
    bad_values: Optional[torch.Tensor] = None
    describe: Callable[[], Optional[str]] = lambda: None

    def resolve(self) -> Optional[str]:
        """Returns: the error message, or None; reads the device flag at most once."""
        if self.error is not None or self.bad_values is None:
            return self.error
        return self.describe() if read_flags(self.bad_values)[0] else None


def read_flags(flags: torch.Tensor) -> List[int]:
    """The one host read of a step's validation flags (a device sync on accelerators)."""
    return flags.reshape(-1).tolist()


def raise_on_any_rank(
    check: InputCheck,
    pg: Optional[dist.ProcessGroup],
    device: torch.device,
    batch_size: Optional[int] = None,
) -> None:
    """Raises ``ValueError`` on every rank if any rank has bad input.

    A bad batch on one rank must not leave the others waiting in the next
    all-to-all: the ranks agree (one tiny all-reduce of the device-side flags,
    then one host read) before any collective. The rank with the bad input
    raises its own message, the others ``bad input on rank r: ...``.

    Args:
        check (InputCheck): this rank's validation.
        pg (Optional[dist.ProcessGroup]): the sharded module's group (None: local only).
        device (torch.device): device for the flag (CUDA for NCCL).
        batch_size (Optional[int]): if given, every rank must have this same
            batch size (TorchRec's row-wise output dist needs it).
    """
    if pg is None or dist.get_world_size(pg) == 1:
        error = check.resolve()
        if error is not None:
            raise ValueError(error)
        return
    b = -1 if batch_size is None else batch_size
    flag = torch.tensor([1 if check.error is not None else 0, b, -b], device=device)
    if check.error is None and check.bad_values is not None:
        flag[0] += check.bad_values.to(device=device, dtype=flag.dtype).clamp(max=1)
    local_bad = flag[0].clone()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=pg)
    any_bad, high, neg_low = read_flags(flag)
    if any_bad == 0:
        if batch_size is not None and high != -neg_low:
            raise ValueError(
                f"batch sizes differ across ranks ({-neg_low} to {high}; this rank {batch_size}): "
                "row-wise sharded tables need equal batch sizes on every rank; pad the trailing batches "
                "(memcom_torchrec.data.pad_batch)"
            )
        return
    error = check.error if check.error is not None else (check.describe() if int(local_bad) else None)
    messages: List[Optional[str]] = [None] * dist.get_world_size(pg)
    dist.all_gather_object(messages, error, group=pg)
    if error is not None:
        raise ValueError(error)
    first = next(i for i, m in enumerate(messages) if m is not None)
    raise ValueError(f"bad input on rank {first}: {messages[first]}")


def check_features(
    features: KeyedJaggedTensor,
    num_embeddings_per_feature: Dict[str, int],
    table_per_feature: Dict[str, str],
    is_weighted: bool,
) -> InputCheck:
    """Checks a KJT against the collection's features, without reading device values.

    Args:
        features (KeyedJaggedTensor): the input.
        num_embeddings_per_feature (Dict[str, int]): valid id range ``[0, n)``
            of every expected feature.
        table_per_feature (Dict[str, str]): table of every feature, for messages.
        is_weighted (bool): whether the collection expects per-id weights.

    Returns:
        InputCheck: structural errors found on the host, and a device-side
        count of negative bag lengths and ids out of range.
    """
    if not isinstance(features, KeyedJaggedTensor):
        return InputCheck(f"expected a KeyedJaggedTensor, got {type(features).__name__}")
    keys: List[str] = features.keys()
    expected = set(num_embeddings_per_feature)
    unknown = [k for k in keys if k not in expected]
    if unknown:
        return InputCheck(f"unknown feature key(s) {unknown}; this collection has features {sorted(expected)}")
    missing = [k for k in num_embeddings_per_feature if k not in keys]
    if missing:
        return InputCheck(f"missing feature key(s) {missing} in the input KeyedJaggedTensor (keys {keys})")
    if len(set(keys)) != len(keys):
        return InputCheck(f"duplicate feature keys in the input: {keys}")
    if features.variable_stride_per_key():
        return InputCheck("variable batch size per feature (VBE) KeyedJaggedTensors are not supported")
    values = features.values()
    if values.dtype not in (torch.int32, torch.int64):
        where = f"feature '{keys[0]}': " if keys else ""
        return InputCheck(f"{where}ids must be int32 or int64, got {values.dtype}")
    weights = features.weights_or_none()
    if is_weighted and weights is None:
        return InputCheck("this collection is weighted (is_weighted=True) but the input has no weights")
    if not is_weighted and weights is not None:
        return InputCheck("the input carries weights but the collection was built with is_weighted=False")
    if weights is not None and not weights.is_floating_point():
        return InputCheck(f"weights must be floating point, got {weights.dtype}")
    lengths = features.lengths()
    if lengths.numel() == 0:
        return InputCheck()
    # The KJT's per-key totals are host metadata (TorchRec's all-to-all needs them too).
    length_per_key = features.length_per_key()
    for key, total in zip(keys, length_per_key):
        if total < 0:
            return InputCheck(f"feature '{key}': negative bag lengths (total {total})")
    if sum(length_per_key) != values.numel():
        return InputCheck(f"the bag lengths add up to {sum(length_per_key)} ids but the input has {values.numel()}")
    bad = (lengths < 0).sum()
    # One pass per key (min and max together), compared with the key's bound.
    offsets = features.offset_per_key()
    present = [k for k, total in enumerate(length_per_key) if total > 0]
    if present:
        extremes = torch.stack([torch.stack(torch.aminmax(values[offsets[k] : offsets[k + 1]])) for k in present])
        bounds = torch.tensor(
            [num_embeddings_per_feature[keys[k]] for k in present], dtype=values.dtype, device=values.device
        )
        bad = bad + (extremes[:, 0] < 0).sum() + (extremes[:, 1] >= bounds).sum()

    def describe() -> Optional[str]:
        return _describe_bad_values(features, num_embeddings_per_feature, table_per_feature)

    return InputCheck(bad_values=bad, describe=describe)


def _describe_bad_values(
    features: KeyedJaggedTensor,
    num_embeddings_per_feature: Dict[str, int],
    table_per_feature: Dict[str, str],
) -> Optional[str]:
    """The message for the first negative bag length or bad id (reads values back)."""
    keys, lengths, values = features.keys(), features.lengths(), features.values()
    if bool((lengths < 0).any()):
        per_key = lengths.view(len(keys), -1)
        bad = int((per_key < 0).any(dim=1).nonzero()[0])
        return f"feature '{keys[bad]}': negative bag length {int(per_key[bad].min())}"
    if values.numel() == 0:
        return None
    bounds = torch.tensor([num_embeddings_per_feature[k] for k in keys], dtype=values.dtype, device=values.device)
    upper = torch.repeat_interleave(
        bounds, torch.tensor(features.length_per_key(), device=values.device), output_size=values.numel()
    )
    bad_mask = (values < 0) | (values >= upper)
    if not bool(bad_mask.any()):
        return None
    pos = int(bad_mask.nonzero()[0])
    offsets = features.offset_per_key()
    k = next(j for j in range(len(keys)) if offsets[j] <= pos < offsets[j + 1])
    value, feature = int(values[pos]), keys[k]
    if value < 0:
        return f"feature '{feature}': negative id {value} for table '{table_per_feature[feature]}'"
    return (
        f"feature '{feature}': id {value} is out of range for table "
        f"'{table_per_feature[feature]}' (num_embeddings={num_embeddings_per_feature[feature]})"
    )


def validate_features(
    features: KeyedJaggedTensor,
    num_embeddings_per_feature: Dict[str, int],
    table_per_feature: Dict[str, str],
    is_weighted: bool,
) -> Optional[str]:
    """``check_features``, resolved: ``None`` if the input is valid, else the message.

    Returns:
        Optional[str]: an error message naming the feature and the bad value.
    """
    return check_features(features, num_embeddings_per_feature, table_per_feature, is_weighted).resolve()


def check_feature_specs(features: KeyedJaggedTensor, specs: Mapping[str, Any], is_weighted: bool) -> InputCheck:
    """``check_features`` against a collection's feature specs (each with ``num_embeddings`` and ``table``)."""
    return check_features(
        features,
        {f: s.num_embeddings for f, s in specs.items()},
        {f: s.table for f, s in specs.items()},
        is_weighted,
    )


def validate_feature_specs(features: KeyedJaggedTensor, specs: Mapping[str, Any], is_weighted: bool) -> Optional[str]:
    """``validate_features`` against a collection's feature specs (each with ``num_embeddings`` and ``table``).

    Returns:
        Optional[str]: ``None`` if valid, else the error message.
    """
    return check_feature_specs(features, specs, is_weighted).resolve()
