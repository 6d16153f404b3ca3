"""The grid the phone export quantises every weight matrix to, defined once for export and training.

Weight-only and asymmetric through torchao's ``IntxWeightOnlyConfig``: int8 with one scale and
zero point per row, int4 with one per 32 columns where the width is a multiple of 32 above 32
(per row otherwise), ``int4_row`` int4 with one per row whatever the width (half the scales of
group-wise int4 at width 64, a coarser grid). Per-entity scalars (MEmCom's ``w``, item biases) are stored as float16.
``export.quantize.quantize_slim`` quantises with these configs; quantisation-aware training
(``train.qat``) trains against ``fake_quantize_rows`` / ``fake_quantize_half``, the same grid.
"""

import torch
from torch import nn

FP32, INT8, INT4, INT4_ROW = "fp32", "int8", "int4", "int4_row"
DTYPES = (FP32, INT8, INT4, INT4_ROW)
INTEGER_DTYPES = (INT8, INT4, INT4_ROW)
GROUP_SIZE = 32


def is_grouped(dtype: str, width: int) -> bool:
    """Whether rows of ``width`` columns get one scale per ``GROUP_SIZE`` columns (int4 only)."""
    return dtype == INT4 and width % GROUP_SIZE == 0 and width > GROUP_SIZE


def weight_only_config(dtype: str, grouped: bool):  # pyre-ignore[3]: torchao's config
    """torchao's ``IntxWeightOnlyConfig`` for ``dtype`` (``int8`` / ``int4`` / ``int4_row``), per row or per group."""
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_api import IntxWeightOnlyConfig, MappingType

    if dtype not in INTEGER_DTYPES:
        raise ValueError(f"no integer grid for dtype '{dtype}'; choose one of {list(INTEGER_DTYPES)}")
    return IntxWeightOnlyConfig(
        weight_dtype=torch.int8 if dtype == INT8 else torch.int4,
        granularity=PerGroup(GROUP_SIZE) if grouped else PerAxis(0),
        mapping_type=MappingType.ASYMMETRIC,
    )


@torch.no_grad()
def fake_quantize_rows(weight: torch.Tensor, dtype: str) -> torch.Tensor:
    """``weight`` (rows x width) quantised to the export's grid and dequantised, as its lookups read it.

    Args:
        weight (torch.Tensor): a table or a linear layer's ``out x in`` weight.
        dtype (str): ``int8``, ``int4`` or ``int4_row``.

    Returns:
        torch.Tensor: float32, the same shape.
    """
    from torchao.quantization.quant_api import quantize_

    rows, width = int(weight.shape[0]), int(weight.shape[1])
    if rows == 0:
        return weight.detach().float().clone()
    table = nn.Embedding(rows, width)
    table.weight = nn.Parameter(weight.detach().float().clone().contiguous(), requires_grad=False)
    quantize_(table, weight_only_config(dtype, is_grouped(dtype, width)), filter_fn=lambda m, fqn: True)
    return table(torch.arange(rows)).float()


def fake_quantize_half(values: torch.Tensor) -> torch.Tensor:
    """``values`` rounded to float16 (how the export stores per-entity scalars), as float32."""
    return values.detach().half().float()
