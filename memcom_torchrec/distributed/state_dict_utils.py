"""Moving parameters between sharded and unsharded models.

TorchRec does not copy weights when it shards a module: shard first, then
load. These helpers copy a full (unsharded) state_dict into a sharded model's
local shards, and gather a sharded model's state_dict into full tensors.
"""

from typing import Dict, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor


def _strip(key: str) -> str:
    return key[len("module."):] if key.startswith("module.") else key


@torch.no_grad()
def load_unsharded_state_dict(model: nn.Module, full_state_dict: Mapping[str, torch.Tensor]) -> None:
    """Copies full tensors into every local shard of a (sharded) model.

    Args:
        model (nn.Module): a DistributedModelParallel or any module.
        full_state_dict (Mapping[str, torch.Tensor]): unsharded parameters,
            keyed as the unsharded model's ``state_dict()``.

    Raises:
        KeyError: a key of the model is missing from ``full_state_dict``.
        ValueError: a tensor has the wrong shape.
    """
    full = {_strip(k): v for k, v in full_state_dict.items()}
    for key, target in model.state_dict().items():
        name = _strip(key)
        if name not in full:
            raise KeyError(f"'{name}' missing from the state_dict to load")
        src = full[name]
        if isinstance(target, ShardedTensor):
            if tuple(target.size()) != tuple(src.shape):
                raise ValueError(f"'{name}': shape {tuple(src.shape)} != sharded {tuple(target.size())}")
            for shard in target.local_shards():
                index = tuple(
                    slice(o, o + s) for o, s in zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes)
                )
                shard.tensor.copy_(src[index])
        elif isinstance(target, DTensor):
            target.to_local().copy_(src[_dtensor_local_index(target)])
        else:
            if tuple(target.shape) != tuple(src.shape):
                raise ValueError(f"'{name}': shape {tuple(src.shape)} != {tuple(target.shape)}")
            target.copy_(src)


def _dtensor_local_index(t: DTensor) -> tuple:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return tuple(slice(o, o + s) for o, s in zip(offset, shape))


@torch.no_grad()
def gather_unsharded_state_dict(model: nn.Module, dst: Optional[int] = 0) -> Dict[str, torch.Tensor]:
    """Gathers a sharded model's state_dict into full CPU tensors.

    A collective: every rank must call it. Args: ``dst`` the rank that
    receives the tensors (``None``: every rank). Returns: the full
    state_dict on ``dst`` (or everywhere), an empty dict elsewhere.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    out: Dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        name = _strip(key)
        if isinstance(value, ShardedTensor):
            nccl = dist.is_initialized() and dist.get_backend() == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
            full = torch.zeros(value.size(), dtype=value.dtype, device=device)
            for shard in value.local_shards():
                index = tuple(
                    slice(o, o + s) for o, s in zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes)
                )
                full[index] = shard.tensor.to(device)
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(full)  # shards are disjoint: a sum assembles them
            tensor = full.cpu()
        elif isinstance(value, DTensor):
            tensor = value.full_tensor().cpu()
        else:
            tensor = value.detach().cpu().clone()
        if dst is None or rank == dst:
            out[name] = tensor
    return out
