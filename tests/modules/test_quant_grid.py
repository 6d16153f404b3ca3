"""The export's quantisation grid (modules/quant_grid.py), which quantisation-aware training trains against."""

import pytest
import torch

from memcom_torchrec.modules.quant_grid import INT4, INT4_ROW, INT8, fake_quantize_half, fake_quantize_rows, is_grouped

pytest.importorskip("torchao")


@pytest.mark.parametrize("dtype,width,levels", [(INT8, 16, 256), (INT4, 64, 16), (INT4, 16, 16), (INT4_ROW, 64, 16)])
def test_rows_land_on_a_grid_of_the_dtype(dtype: str, width: int, levels: int):
    torch.manual_seed(0)
    w = torch.randn(7, width) * torch.linspace(0.1, 3, 7)[:, None]
    q = fake_quantize_rows(w, dtype)
    assert q.shape == w.shape and q.dtype == torch.float32
    group = 32 if is_grouped(dtype, width) else width
    for row in range(7):
        for g in range(0, width, group):
            block, orig = q[row, g:g + group], w[row, g:g + group]
            assert len(torch.unique(block)) <= levels
            step = (orig.max() - orig.min()) / (levels - 1)
            assert (block - orig).abs().max() <= step / 2 + 1e-6  # nearest level, within half a step
    # a point of the grid stays where it is: training against it is stable
    assert torch.allclose(fake_quantize_rows(q, dtype), q, atol=1e-6, rtol=0)
    assert not torch.allclose(q, w, atol=1e-4)


def test_grouping_follows_the_export():
    assert is_grouped(INT4, 64) and not is_grouped(INT4, 32) and not is_grouped(INT4, 48)
    assert not is_grouped(INT8, 64) and not is_grouped(INT4_ROW, 64)


def test_scalars_round_to_float16():
    v = torch.tensor([0.1, 1 / 3, 1e-8, -2.5e4])
    assert torch.equal(fake_quantize_half(v), v.half().float())
