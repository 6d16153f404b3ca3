"""The gradient of MEmCom's ``w`` computed beside FBGEMM, not by it (the CPU lookup path).

A MEmCom bag is ``sum_j w[i_j] * U[h(i_j)]``, so the gradient of one looked-up
``w[i_j]`` is ``<U[h(i_j)], grad_bag>``, with ``U``'s values from before the
step's update. FBGEMM computes it when its per-sample weights require a
gradient, but on CPU that kernel
(``split_embedding_codegen_grad_indice_weights_cpu``) costs as much as the
lookup itself (``benchmarks/RESULTS_core.md``). This path computes it instead
with ATen's fused per-sample-weight gradient of ``embedding_bag`` (2-4x
cheaper on these CPUs, and cheaper than gathering the rows and multiplying):

1. the sharded module feeds FBGEMM plain values of ``w`` as per-sample weights
   (no autograd), with ``feature_requires_grad`` all zero, and records which
   entries of ``w`` each id read (``EntityWeightGradient.expect``);
2. a forward hook on the TBE wraps its pooled output in an identity autograd
   node; the node's backward runs before the TBE's (it sits after it in the
   graph), so ``U`` still holds its pre-update values. It computes
   ``grad_w`` and applies ``w``'s optimizer step (``ShardedEntityWeights.step``),
   then passes the output gradient on unchanged to FBGEMM's fused update of ``U``.

Only the forward hook and the backward read host values (the TBE's offsets), so
this path is meant for CPU; on CUDA, FBGEMM's weighted kernels compute the same
gradient without a host read.
"""

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from memcom_torchrec.distributed.entity_weights import ShardedEntityWeights
from memcom_torchrec.optim.fused_step import FeatureGradient


@dataclass
class PendingFeature:
    """One feature of a TBE whose ids read ``w``.

    Args:
        position (int): the feature's place among the TBE's features.
        table (str): the MEmCom table (its ``w`` in ``ShardedEntityWeights``).
        index (torch.Tensor): per id, the position it read in the local ``w``.
    """

    position: int
    table: str
    index: torch.Tensor


class _EntityWeightGradientNode(torch.autograd.Function):
    """Identity on a TBE's pooled output; its backward trains ``w`` from ``grad_output``."""

    @staticmethod
    def forward(  # pyre-ignore[14]
        ctx: Any,
        pooled: torch.Tensor,
        owner: "EntityWeightGradient",
        tbe: nn.Module,
        indices: torch.Tensor,
        offsets: torch.Tensor,
        pending: List[PendingFeature],
    ) -> torch.Tensor:
        ctx.owner, ctx.tbe, ctx.pending = owner, tbe, pending
        ctx.save_for_backward(indices, offsets)
        return pooled.view_as(pooled)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> Any:  # pyre-ignore[14]
        indices, offsets = ctx.saved_tensors
        ctx.owner.apply_gradient(ctx.tbe, indices, offsets, ctx.pending, grad_output)
        return grad_output, None, None, None, None, None


class EntityWeightGradient:
    """Trains a sharded collection's ``w`` from the pooled gradient of its TBEs.

    Args:
        entity_weights (ShardedEntityWeights): this rank's ``w``.

    Example::

        grads = EntityWeightGradient(self._entity_weight_shards)
        grads.attach(tbe)                          # once per FBGEMM TBE
        grads.expect(tbe, [PendingFeature(...)])   # each step, before the lookup
    """

    def __init__(self, entity_weights: ShardedEntityWeights) -> None:
        self._entity_weights = entity_weights
        self._pending: Dict[int, List[PendingFeature]] = {}

    def attach(self, tbe: nn.Module) -> None:
        """Hooks a TBE: its next forward with expected features gets the gradient node."""
        tbe.register_forward_hook(self._hook, with_kwargs=True)

    def expect(self, tbe: nn.Module, pending: List[PendingFeature]) -> None:
        """Records the ``w`` read by the TBE's next forward (replacing any stale record)."""
        self._pending[id(tbe)] = pending

    def _hook(self, tbe: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], output: torch.Tensor) -> Any:
        pending = self._pending.pop(id(tbe), None)
        if not pending or not torch.is_grad_enabled():
            return output
        indices = kwargs["indices"] if "indices" in kwargs else args[0]
        offsets = kwargs["offsets"] if "offsets" in kwargs else args[1]
        return _EntityWeightGradientNode.apply(output, self, tbe, indices, offsets, pending)

    def apply_gradient(
        self,
        tbe: nn.Module,
        indices: torch.Tensor,
        offsets: torch.Tensor,
        pending: List[PendingFeature],
        grad_output: torch.Tensor,
    ) -> None:
        """``grad_w[j] = <U[row_j], grad_output[bag_j]>`` per pending feature, then ``w``'s update.

        Args:
            tbe (nn.Module): the FBGEMM TBE (``U`` still pre-update).
            indices (torch.Tensor): the TBE's input rows.
            offsets (torch.Tensor): the TBE's bag offsets (``T * B + 1``).
            pending (List[PendingFeature]): the features that read ``w``.
            grad_output (torch.Tensor): ``B x sum(D)`` gradient of the pooled output.
        """
        with torch.no_grad():
            num_features = len(tbe.feature_table_map)  # pyre-ignore[16]
            batch = (offsets.numel() - 1) // num_features
            dims = tbe.D_offsets.tolist()  # pyre-ignore[16]
            tables = tbe.split_embedding_weights()  # pyre-ignore[29]
            per_table: Dict[str, Tuple[torch.Tensor, List[FeatureGradient]]] = {}
            for feature in pending:
                t = feature.position
                bag_offsets = offsets[t * batch : (t + 1) * batch + 1]
                start, end = int(bag_offsets[0]), int(bag_offsets[-1])
                U = tables[tbe.feature_table_map[t]]  # pyre-ignore[16]
                per_table.setdefault(feature.table, (U, []))[1].append(FeatureGradient(
                    grad=grad_output[:, dims[t] : dims[t + 1]],
                    rows=indices[start:end].long(),
                    bag_offsets=(bag_offsets - start).long(),
                    positions=feature.index,
                ))
            for table, (U, features) in per_table.items():
                self._entity_weights.step(table, U, features)

def pending_features(
    tbe_features: List[Tuple[nn.Module, List[Tuple[int, int]]]],
    tables: List[Optional[str]],
    indices: List[Optional[torch.Tensor]],
) -> List[Tuple[nn.Module, List[PendingFeature]]]:
    """Groups a lookup's per-key ``w`` positions by the TBE that reads each key.

    Args:
        tbe_features (List[Tuple[nn.Module, List[Tuple[int, int]]]]): per TBE
            of the lookup, ``(key index in the lookup's KJT, feature position in the TBE)``.
        tables (List[Optional[str]]): per key, its table.
        indices (List[Optional[torch.Tensor]]): per key, the ``w`` positions
            its ids read (None: no ``w``).

    Returns:
        List[Tuple[nn.Module, List[PendingFeature]]]: per TBE, what to ``expect``.
    """
    out = []
    for tbe, keys in tbe_features:
        pending = [
            PendingFeature(position=t, table=tables[k], index=indices[k])  # pyre-ignore[6]
            for k, t in keys
            if indices[k] is not None
        ]
        if pending:
            out.append((tbe, pending))
    return out
