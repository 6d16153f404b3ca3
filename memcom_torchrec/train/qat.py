"""Quantisation-aware training for the dtype a phone program ships in (``--qat int8|int4|int4_row``).

FBGEMM's fused TBE reads its tables inside the kernel and updates them inside the backward
pass, so a fake-quantising module cannot sit between a table and its lookup. The design here
is the straight-through estimator with float masters, applied around each step:

1. ``project()``: every tensor the export quantises is saved (its float master) and replaced
   in place by its value on the export's grid (``modules.quant_grid``): the tables (``U``,
   ``Q``/``R``, plain tables: this rank's rows, which the grid treats row by row) and the linear
   layers' weights by ``fake_quantize_rows``; ``w`` and the item biases by ``fake_quantize_half``.
2. The step runs as usual: forward and backward see the grid values, the fused and dense
   optimizers update them in place (``P -> P + delta``).
3. ``restore()``: each master takes the update, ``M + delta``, so small updates accumulate in
   float instead of being rounded away.

Validation and test run inside ``project()`` / ``restore()`` too (they score what the export will
ship), and checkpoints hold the masters: ``memcom-export --dtype`` of a QAT run quantises them to
exactly the grid its training saw.
"""

import contextlib
from typing import Iterator, List, Tuple

import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor

from memcom_torchrec.modules.quant_grid import INTEGER_DTYPES, fake_quantize_half, fake_quantize_rows

QAT_DTYPES = INTEGER_DTYPES
ROWS, HALF = "rows", "half"


def qat_targets(model: nn.Module) -> List[Tuple[str, torch.Tensor, str]]:
    """``(name, tensor, grid)`` of every tensor of a (sharded) model the export quantises.

    Tables come from the state dict's sharded tensors (their local shards are views of the fused
    kernels' weights); ``_entity_weights`` (MEmCom's ``w``) and item biases go to float16; every
    ``nn.Linear`` weight to the row grid (its biases stay float32, as exported).
    """
    targets: List[Tuple[str, torch.Tensor, str]] = []
    for name, value in model.state_dict(keep_vars=True).items():
        if not isinstance(value, ShardedTensor):
            continue
        grid = HALF if "_entity_weights" in name else ROWS if value.dim() == 2 else None
        if grid is None:
            raise ValueError(f"qat: no grid for sharded tensor '{name}' of shape {tuple(value.size())}")
        targets += [(name, shard.tensor, grid) for shard in value.local_shards()]
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            targets.append((f"{module_name}.weight", module.weight, ROWS))
    for name, param in model.named_parameters():
        if name.endswith("item_bias"):
            targets.append((name, param, HALF))
    return targets


class QuantizationAwareTraining:
    """Swaps a model's quantised tensors to the export's grid around each step (see the module docstring).

    Args:
        model (nn.Module): the sharded training model.
        dtype (str): ``int8``, ``int4`` or ``int4_row``, the ``--dtype`` the model will be exported at.
    """

    def __init__(self, model: nn.Module, dtype: str) -> None:
        if dtype not in QAT_DTYPES:
            raise ValueError(f"--qat '{dtype}': choose one of {list(QAT_DTYPES)}")
        self.dtype = dtype
        self.targets = qat_targets(model)
        self._saved: List[Tuple[torch.Tensor, torch.Tensor]] = []

    @torch.no_grad()
    def project(self) -> None:
        """Saves every master and writes its grid value in its place."""
        if self._saved:
            raise RuntimeError("qat: project() twice without restore()")
        for _, tensor, grid in self.targets:
            master = tensor.detach().clone()
            value = (fake_quantize_rows(master, self.dtype) if grid == ROWS else fake_quantize_half(master))
            value = value.to(tensor.dtype).reshape(tensor.shape)
            tensor.copy_(value)
            self._saved.append((master, value))

    @contextlib.contextmanager
    def on_grid(self) -> Iterator[None]:
        """The model on the export's grid inside the block (``project()``, then ``restore()``)."""
        self.project()
        try:
            yield
        finally:
            self.restore()

    @torch.no_grad()
    def restore(self) -> None:
        """Gives each master the update its grid value received since ``project()``."""
        for (_, tensor, _), (master, value) in zip(self.targets, self._saved):
            tensor.copy_(master + (tensor.detach() - value))
        self._saved = []
