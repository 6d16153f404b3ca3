"""Input checks shared by the unsharded and sharded MEmCom collections.

Everything here runs before any FBGEMM kernel sees the ids, so bad input
raises a ``ValueError`` naming the feature and the offending value instead of
crashing (or silently reading the wrong row) inside C++.
"""

from typing import Dict, List, Optional

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


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
