"""``EntityWeightFusedOptimizer``: per-entity weights ``w`` in TorchRec's fused optimizer.

Sharded collections train ``w`` inside the backward pass
(``fused_step.entity_weight_step_``; ``entity_weight_lookup`` and ``sparse_update_``
where FBGEMM computes ``w``'s gradient), as FBGEMM trains its tables.
This KeyedOptimizer exposes those updates the way TorchRec exposes FBGEMM's:
``w`` and its optimizer state as ``ShardedTensor``s under the parameter's name
(so ``state_dict``, ``load_state_dict`` and ``torch.distributed.checkpoint``
handle them), and ``param_groups`` holding the hyper-parameters every update
reads (so LR schedulers apply). MEmCom (``(m, Q)`` grid next to ``U``) and
memcom_qr (flat ``n`` scalars next to ``Q``) use it alike.
"""

from typing import Any, Dict, Mapping, Protocol

import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.optim.keyed import KeyedOptimizer

from memcom_torchrec.optim.entity_weight_optimizer import EntityWeightOptimizerConfig


class EntityWeightSlice(Protocol):
    """What the optimizer reads of one table's local ``w`` slice."""

    table: str
    states: Dict[str, torch.Tensor]  # local optimizer states (Adam: plus a 0-d "step")
    config: EntityWeightOptimizerConfig
    sharded: ShardedTensor  # the table's w
    sharded_states: Dict[str, ShardedTensor]  # the same states as ShardedTensors


class EntityWeightFusedOptimizer(KeyedOptimizer):
    """KeyedOptimizer view of the fused per-entity weight updates.

    ``step()`` and ``zero_grad()`` do nothing: updates happen in the backward
    pass. ``param_groups`` carry the hyper-parameters read at every update, so
    LR schedulers and ``load_state_dict`` work as for FBGEMM's fused tables.

    Args:
        slices (Mapping[str, EntityWeightSlice]): parameter name -> the local
            slice of a table's ``w`` (its ShardedTensor, optimizer states and config).
    """

    def __init__(self, slices: Mapping[str, EntityWeightSlice]) -> None:
        params: Dict[str, ShardedTensor] = {key: local.sharded for key, local in slices.items()}
        state: Dict[Any, Any] = {}
        param_groups = []
        for key, local in slices.items():
            param = params[key]
            state[param] = dict(local.sharded_states)
            if "step" in local.states:  # Adam's step counter (bias correction) is checkpointed too
                state[param]["step"] = local.states["step"]
            cfg = local.config
            param_groups.append(
                {
                    "params": [param],
                    "lr": cfg.learning_rate,
                    "eps": cfg.eps,
                    "beta1": cfg.beta1,
                    "beta2": cfg.beta2,
                    "weight_decay": cfg.weight_decay,
                    "optimizer": cfg.optimizer.value,
                }
            )
        super().__init__(params, state, param_groups)
        self._groups_by_table: Dict[str, Dict[str, Any]] = {
            local.table: group for local, group in zip(slices.values(), self.param_groups)
        }

    def group_of(self, table: str) -> Dict[str, Any]:
        """Returns: the param group (live hyper-parameters) of a table's ``w``."""
        return self._groups_by_table[table]

    def zero_grad(self, set_to_none: bool = False) -> None:
        pass

    def step(self, closure: Any = None) -> None:  # pyre-ignore[14]
        pass
