"""Per-entity weights ``w`` looked up and updated inside the backward pass.

MEmCom's ``w`` has one scalar per entity, millions of them, each touched only
when its entity appears in a batch. A dense gradient over all ``n`` would cost
``O(n)`` per step, so ``w`` is trained like FBGEMM trains ``U``: the lookup is
an autograd function whose backward coalesces the gradient of the looked-up
scalars (duplicate ids summed, as FBGEMM's ``EXACT_*`` optimizers do) and
applies the optimizer to those rows in place. No gradient tensor of ``w`` ever
exists.

The optimizer family follows the table's FBGEMM optimizer so ``U`` and ``w``
train alike. For a scalar "row", row-wise Adagrad equals Adagrad and partial
row-wise Adam equals Adam.
"""

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType

_SGD = (EmbOptimType.EXACT_SGD, EmbOptimType.SGD)
_ADAGRAD = (
    EmbOptimType.EXACT_ADAGRAD,
    EmbOptimType.EXACT_ROWWISE_ADAGRAD,
    EmbOptimType.ROWWISE_ADAGRAD,
)
_ADAM = (EmbOptimType.ADAM, EmbOptimType.PARTIAL_ROWWISE_ADAM)


@dataclass
class EntityWeightOptimizerConfig:
    """Optimizer of one table's per-entity weights, mirroring its FBGEMM optimizer.

    Args:
        optimizer (EmbOptimType): the table's fused optimizer.
        learning_rate (float): step size.
        eps (float): Adagrad/Adam epsilon (FBGEMM's default 1e-8).
        beta1 (float): Adam first-moment decay.
        beta2 (float): Adam second-moment decay.
        weight_decay (float): L2 weight decay (SGD/Adagrad: added to the gradient).
    """

    optimizer: EmbOptimType = EmbOptimType.EXACT_ROWWISE_ADAGRAD
    learning_rate: float = 0.01
    eps: float = 1.0e-8
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.optimizer not in _SGD + _ADAGRAD + _ADAM:
            raise ValueError(
                f"optimizer {self.optimizer} is not supported for MEmCom per-entity weights; "
                f"use one of {[o.name for o in _SGD + _ADAGRAD + _ADAM]}"
            )

    @classmethod
    def from_fused_params(cls, fused_params: Mapping[str, Any]) -> "EntityWeightOptimizerConfig":
        """Builds the config from a table's TorchRec/FBGEMM fused params."""
        optimizer = fused_params.get("optimizer", EmbOptimType.EXACT_ROWWISE_ADAGRAD)
        if isinstance(optimizer, str):
            optimizer = EmbOptimType(optimizer)
        defaults = cls()
        return cls(
            optimizer=optimizer,
            learning_rate=float(fused_params.get("learning_rate", defaults.learning_rate)),
            eps=float(fused_params.get("eps", defaults.eps)),
            beta1=float(fused_params.get("beta1", defaults.beta1)),
            beta2=float(fused_params.get("beta2", defaults.beta2)),
            weight_decay=float(fused_params.get("weight_decay", defaults.weight_decay)),
        )

    def state_names(self) -> List[str]:
        """Names of the per-entity optimizer states (FBGEMM's naming)."""
        if self.optimizer in _ADAGRAD:
            return ["momentum1"]
        if self.optimizer in _ADAM:
            return ["exp_avg", "exp_avg_sq"]
        return []


def sparse_update_(
    weights: torch.Tensor,
    states: Dict[str, torch.Tensor],
    indices: torch.Tensor,
    grad: torch.Tensor,
    group: Mapping[str, Any],
    optimizer: EmbOptimType,
) -> None:
    """Applies one optimizer step to the rows ``indices`` of a flat weight tensor.

    Args:
        weights (torch.Tensor): flat ``w`` (updated in place).
        states (Dict[str, torch.Tensor]): flat optimizer states (updated in place);
            Adam also keeps a 0-d ``step`` tensor.
        indices (torch.Tensor): looked-up positions, duplicates allowed.
        grad (torch.Tensor): gradient of every looked-up position.
        group (Mapping[str, Any]): hyper-parameters (``lr``, ``eps``, ``beta1``,
            ``beta2``, ``weight_decay``), read at every step so schedulers apply.
        optimizer (EmbOptimType): update rule.
    """
    if indices.numel() == 0:
        if optimizer in _ADAM:
            states["step"] += 1
        return
    # Duplicates coalesced by a sort; int32 keys sort ~1.6x faster than int64 on CPU.
    keys = indices.int() if weights.numel() < 2**31 else indices
    rows, inverse = torch.unique(keys, return_inverse=True)
    rows = rows.long()
    g = torch.zeros(rows.shape, dtype=torch.float32, device=grad.device)
    g.index_add_(0, inverse, grad.float())
    # index_select / index_copy_ rather than advanced indexing: ~3x cheaper on 1-D tensors.
    w = weights.index_select(0, rows)
    lr, wd = group["lr"], group["weight_decay"]
    if optimizer in _SGD:
        if wd:
            g = g + wd * w
        weights.index_copy_(0, rows, w - lr * g)
    elif optimizer in _ADAGRAD:
        if wd:
            g = g + wd * w
        acc = states["momentum1"].index_select(0, rows).addcmul_(g, g)
        states["momentum1"].index_copy_(0, rows, acc)
        weights.index_copy_(0, rows, w - lr * g / (acc.sqrt() + group["eps"]))
    else:
        b1, b2 = group["beta1"], group["beta2"]
        states["step"] += 1
        t = float(states["step"])
        m1 = states["exp_avg"].index_select(0, rows).mul_(b1).add_(g, alpha=1 - b1)
        m2 = states["exp_avg_sq"].index_select(0, rows).mul_(b2).addcmul_(g, g, value=1 - b2)
        states["exp_avg"].index_copy_(0, rows, m1)
        states["exp_avg_sq"].index_copy_(0, rows, m2)
        update = (m1 / (1 - b1**t)) / ((m2 / (1 - b2**t)).sqrt() + group["eps"])
        weights.index_copy_(0, rows, w - lr * (update + wd * w))


class _EntityWeightLookup(torch.autograd.Function):
    """``weights[indices]`` whose backward updates ``weights`` in place."""

    @staticmethod
    def forward(  # pyre-ignore[14]
        ctx: Any,
        anchor: torch.Tensor,
        weights: torch.Tensor,
        indices: torch.Tensor,
        states: Dict[str, torch.Tensor],
        group: Mapping[str, Any],
        optimizer: EmbOptimType,
        grad_scale: float,
    ) -> torch.Tensor:
        ctx.save_for_backward(indices)
        ctx.weights, ctx.states, ctx.group, ctx.optimizer = weights, states, group, optimizer
        ctx.grad_scale = grad_scale
        return weights.index_select(0, indices)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:  # pyre-ignore[14]
        (indices,) = ctx.saved_tensors
        with torch.no_grad():
            if ctx.grad_scale != 1.0:
                grad = grad * ctx.grad_scale
            sparse_update_(ctx.weights, ctx.states, indices, grad, ctx.group, ctx.optimizer)
        return None, None, None, None, None, None, None


def entity_weight_lookup(
    weights: torch.Tensor,
    indices: torch.Tensor,
    states: Dict[str, torch.Tensor],
    group: Mapping[str, Any],
    optimizer: EmbOptimType,
    anchor: torch.Tensor,
    grad_scale: float = 1.0,
) -> torch.Tensor:
    """Looks up per-entity weights; the backward pass applies the fused update.

    Args:
        weights (torch.Tensor): flat ``w`` of this shard (no grad).
        indices (torch.Tensor): positions to look up.
        states (Dict[str, torch.Tensor]): flat optimizer states of this shard.
        group (Mapping[str, Any]): the optimizer's param group (hyper-parameters).
        optimizer (EmbOptimType): update rule.
        anchor (torch.Tensor): an empty tensor with ``requires_grad=True`` that
            makes autograd call the backward (``weights`` itself has no grad).
        grad_scale (float): factor applied to the incoming gradient (TorchRec
            multiplies per-sample-weight gradients by the world size; ``w``
            undoes it to be averaged over ranks like ``U``).

    Returns:
        torch.Tensor: ``weights[indices]``, differentiable.
    """
    return _EntityWeightLookup.apply(anchor, weights, indices, states, group, optimizer, grad_scale)
