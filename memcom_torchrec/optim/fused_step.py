"""``w``'s gradient and optimizer step in one pass: the compiled op, and the ATen path it replaces.

A MEmCom bag is ``sum_j w[p_j] * U[r_j]``, so the gradient of a looked-up ``w[p_j]`` is
``<U[r_j], grad_bag>`` (``U`` before the step's update). ``entity_weight_step_`` takes one
table's features (``FeatureGradient``: the pooled output gradient, rows of ``U``, bag offsets and
positions in ``w``), computes every ``grad_w``, sums duplicates and updates ``w`` and its states in
place (``sparse_update_``'s rules).

Two implementations, equal within float rounding:

* ``"compiled"``: ``torch.ops.memcom.entity_weight_step_`` (``csrc/entity_weight_step.cpp``, built
  by ``scripts/setup.sh`` through ``build_ops``): one pass, duplicates summed in a hash table
  instead of a sort, bags and updates spread over OpenMP threads. It checks shapes, dtypes and
  every index before it writes anything.
* ``"aten"``: ATen's per-sample-weight gradient of ``embedding_bag``, then ``sparse_update_``
  (``torch.unique`` and index copies). The reference, and the fallback where the op was not built
  (one warning line says so).

``MEMCOM_ENTITY_WEIGHT_KERNEL=aten`` (or ``set_kernel("aten")``) forces the fallback.
"""

import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType

from memcom_torchrec.optim.build_ops import LIBRARY
from memcom_torchrec.optim.entity_weight_optimizer import _ADAGRAD, _ADAM, _SGD, sparse_update_

logger = logging.getLogger(__name__)

COMPILED, ATEN = "compiled", "aten"
_RULES = {**{o: 0 for o in _SGD}, **{o: 1 for o in _ADAGRAD}, **{o: 2 for o in _ADAM}}
_STATES = {0: [], 1: ["momentum1"], 2: ["exp_avg", "exp_avg_sq"]}
_kernel: Optional[str] = None  # resolved on first use
_load_error: Optional[str] = None  # why the op did not load (said once per process)


@dataclass
class FeatureGradient:
    """One feature's part of a table's ``w`` step.

    Args:
        grad (torch.Tensor): ``B x D`` gradient of the feature's pooled output (rows contiguous;
            a column slice of a wider output is fine).
        rows (torch.Tensor): int64, per id, the row of ``U`` it read.
        bag_offsets (torch.Tensor): int64 ``B + 1`` offsets of the bags into ``rows`` (from 0).
        positions (torch.Tensor): int64, per id, the position of its ``w`` in the flat local ``w``.
    """

    grad: torch.Tensor
    rows: torch.Tensor
    bag_offsets: torch.Tensor
    positions: torch.Tensor


def _load_compiled() -> bool:
    """Loads the built op library once; False (with one warning line per process) where it is missing or stale."""
    global _load_error
    if hasattr(torch.ops.memcom, "entity_weight_step_"):
        return True
    if _load_error is not None:
        return False
    if not os.path.exists(LIBRARY):
        _load_error = "the fused w kernel is not built (python -m memcom_torchrec.optim.build_ops)"
    else:
        try:
            torch.ops.load_library(LIBRARY)
            return True
        except OSError as e:  # built against another torch
            _load_error = (f"the fused w kernel at {LIBRARY} does not load ({str(e).splitlines()[0]}); rebuild it "
                           "with python -m memcom_torchrec.optim.build_ops")
    logger.warning("%s; training w on the ATen fallback", _load_error)
    return False


def kernel() -> str:
    """Returns: the implementation in use, ``"compiled"`` or ``"aten"``."""
    global _kernel
    if _kernel is None:
        wanted = os.environ.get("MEMCOM_ENTITY_WEIGHT_KERNEL", COMPILED)
        if wanted not in (COMPILED, ATEN):
            raise ValueError(f"MEMCOM_ENTITY_WEIGHT_KERNEL={wanted!r}: use {COMPILED!r} or {ATEN!r}")
        _kernel = COMPILED if wanted == COMPILED and _load_compiled() else ATEN
    return _kernel


def set_kernel(name: Optional[str]) -> None:
    """Chooses the implementation (``"compiled"``, ``"aten"``; None: the environment's choice again).

    Raises:
        RuntimeError: ``"compiled"`` asked for but not built.
    """
    global _kernel
    if name == COMPILED and not _load_compiled():
        raise RuntimeError(_load_error)
    if name not in (COMPILED, ATEN, None):
        raise ValueError(f"unknown kernel {name!r}: use {COMPILED!r} or {ATEN!r}")
    _kernel = name


def entity_weight_step_(
    weights: torch.Tensor,
    states: Dict[str, torch.Tensor],
    U: torch.Tensor,
    features: List[FeatureGradient],
    group: Mapping[str, Any],
    optimizer: EmbOptimType,
    implementation: Optional[str] = None,
) -> None:
    """Computes ``grad_w`` of every feature's ids and applies one optimizer step to ``weights``.

    Args:
        weights (torch.Tensor): flat float32 ``w`` of one table's local slice (updated in place).
        states (Dict[str, torch.Tensor]): its flat optimizer states (Adam: plus a 0-d ``step``).
        U (torch.Tensor): the table's rows, before this step's update.
        features (List[FeatureGradient]): the features that read this ``w``.
        group (Mapping[str, Any]): hyper-parameters (``lr``, ``eps``, ``beta1``, ``beta2``,
            ``weight_decay``), read at every step so schedulers apply.
        optimizer (EmbOptimType): the update rule.
        implementation (Optional[str]): ``"compiled"`` or ``"aten"`` (default: ``kernel()``).
    """
    implementation = implementation or kernel()
    if implementation == ATEN:
        return _aten_step_(weights, states, U, features, group, optimizer)
    if implementation != COMPILED:
        raise ValueError(f"unknown implementation {implementation!r}: use {COMPILED!r} or {ATEN!r}")
    if not _load_compiled():
        raise RuntimeError(_load_error)
    rule = _RULES[optimizer]
    step = 0.0
    if rule == 2:
        states["step"] += 1
        step = float(states["step"])
    with torch.no_grad():
        torch.ops.memcom.entity_weight_step_(
            weights, [states[s] for s in _STATES[rule]], [_rows_contiguous(f.grad) for f in features], _rows_contiguous(U),
            [f.rows for f in features], [f.bag_offsets for f in features], [f.positions for f in features],
            rule, float(group["lr"]), float(group["eps"]), float(group["beta1"]), float(group["beta2"]),
            float(group["weight_decay"]), step,
        )


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` as float32 with contiguous rows (the op's layout; a column slice of a wider matrix already is)."""
    t = t.float()
    return t if t.stride(1) == 1 else t.contiguous()


def _aten_step_(
    weights: torch.Tensor,
    states: Dict[str, torch.Tensor],
    U: torch.Tensor,
    features: List[FeatureGradient],
    group: Mapping[str, Any],
    optimizer: EmbOptimType,
) -> None:
    """The reference path: ATen's fused per-sample-weight gradient per feature, then ``sparse_update_``."""
    with torch.no_grad():
        grads = []
        for f in features:
            batch = f.bag_offsets.numel() - 1
            bags = torch.repeat_interleave(torch.arange(batch, device=f.rows.device), f.bag_offsets.diff(),
                                           output_size=f.rows.numel())
            grads.append(torch.ops.aten._embedding_bag_per_sample_weights_backward(
                f.grad.contiguous(), U, f.rows, f.bag_offsets[:-1], bags, 0, -1))  # mode sum, no padding_idx
        if len(features) == 1:
            index, grad = features[0].positions, grads[0]
        else:
            index, grad = torch.cat([f.positions for f in features]), torch.cat(grads)
        sparse_update_(weights, states, index, grad, group, optimizer)
