"""Storage of a slim model: torchao quantisation (``quantize_slim``) and the bytes it stores.

Storage (``dtype``): ``"fp32"``; ``"int8"`` / ``"int4"`` / ``"int4_row"`` quantise with torchao's
own configs (``quantize_slim``): every weight matrix, embedding tables (``U``,
``Q``, ``R``, plain tables) and linear layers alike, weight-only and asymmetric,
int8 with one scale per row, int4 with one scale per 32 columns where the width
allows (per row otherwise), ``int4_row`` int4 with one scale per row, which ExecuTorch runs with its
``quantized_decomposed::embedding_byte`` / ``embedding_4bit`` kernels; per-entity
scalars (MEmCom's ``w``, the item biases) float16. Activations stay float, so a
``.pte`` equals its eager twin to float rounding.

Sizes: ``tensor_bytes`` (one tensor, torchao's packed tensors included) is the only
count of stored bytes; ``state_bytes``, ``embedding_bytes`` and ``dense_bytes`` sum it.
"""

from typing import TYPE_CHECKING

import torch
from torch import nn

from memcom_torchrec.export.lookups import RowTable, ScalarTable
from memcom_torchrec.modules.quant_grid import DTYPES, FP32, is_grouped, weight_only_config

if TYPE_CHECKING:  # slim.py builds its models with quantize_slim
    from memcom_torchrec.export.slim import SlimModel


def half_buffer(module: nn.Module, name: str) -> None:
    """Stores ``module``'s buffer ``name`` as float16 (raises if a value exceeds float16's range)."""
    t = getattr(module, name)
    if t.abs().max().item() > 65000.0:
        raise ValueError(f"{type(module).__name__}.{name} exceeds float16's range; keep dtype='fp32'")
    setattr(module, name, t.half())


class DequantLinear(nn.Module):
    """A linear layer whose weight is stored as an ``out x in`` table (``nn.Embedding``) for torchao.

    ``forward`` reads the whole table through the embedding kernel (for a
    quantised table: ``embedding_byte`` / ``embedding_4bit``, which dequantise
    exactly as torchao's eager tensor does) and applies ``linear``.

    Args:
        linear (nn.Linear): the float layer.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight_rows = RowTable(linear.weight)
        if linear.bias is not None:
            self.register_buffer("bias", linear.bias.detach().float().clone())
        else:
            self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight_rows.all_rows(), self.bias)


def _swap_linears(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, DequantLinear(child))
        else:
            _swap_linears(child)


def quantize_slim(slim: "SlimModel", dtype: str) -> "SlimModel":
    """Quantises a float slim model in place with torchao (see the module docstring); returns it.

    Every weight matrix, embedding tables and linear layers alike, becomes an
    ``nn.Embedding`` quantised by torchao's ``IntxWeightOnlyConfig`` (asymmetric;
    int8 one scale per row, int4 one per 32 columns where the width allows, int4_row one per row), which
    ExecuTorch lowers to ``quantized_decomposed::embedding_byte`` / ``embedding_4bit``;
    per-entity scalars (``w``, item biases) become float16. The result is the
    program's eager twin: torchao's tensors compute with the dequantised weights,
    so a ``.pte`` lowered from it matches it to float rounding. (Linear layers are
    weight-only too: XNNPACK's dynamically quantised activations round differently
    from torchao's eager reference, 4.8e-3 off on one row of a batch of 37,
    ``benchmarks/RESULTS_export.md``, so such a program has no exact eager twin.)
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype '{dtype}'; choose one of {list(DTYPES)}")
    if dtype == FP32:
        return slim
    from torchao.quantization.quant_api import quantize_

    _swap_linears(slim.query)
    _swap_linears(slim.scorer)
    for grouped in (False, True):
        quantize_(slim, weight_only_config(dtype, grouped), filter_fn=lambda m, fqn, g=grouped: isinstance(
            m, nn.Embedding) and g == is_grouped(dtype, m.embedding_dim))
    for module in slim.modules():
        if isinstance(module, ScalarTable):
            half_buffer(module, "weight")
    slim.dtype = dtype
    return slim


# ---------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------
def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor stores; a torchao quantised tensor counts its packed data, scales and zero points."""
    if hasattr(t, "qdata"):
        bits = {torch.int4: 4, torch.int8: 8}.get(getattr(t, "target_dtype", torch.int8), 8)
        extras = [getattr(t, a) for a in ("scale", "zero_point") if getattr(t, a, None) is not None]
        return t.qdata.numel() * bits // 8 + sum(e.numel() * e.element_size() for e in extras)
    return t.numel() * t.element_size()


def state_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer of a module (what a program stores)."""
    return sum(tensor_bytes(t) for t in list(module.parameters()) + list(module.buffers()))


def embedding_bytes(slim: "SlimModel") -> int:
    """Bytes of the slim model's embedding tables (history + user lookups, ``w`` included)."""
    return state_bytes(slim.history) + (state_bytes(slim.user) if slim.user is not None else 0)


def dense_bytes(slim: "SlimModel") -> int:
    """Bytes of the linear layers and item biases (query network + scorer)."""
    return state_bytes(slim.query) + state_bytes(slim.scorer)
