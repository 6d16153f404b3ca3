"""Why the phone export quantises linear layers weight-only: parity of each option with its eager twin.

Exports the slim model of a checkpoint at int8 / int4 two ways and runs each
``.pte`` against its eager torchao model on random batches of 1, 4 and 37:

- ``weight-only``: what ``memcom-export`` does (every weight matrix a torchao
  weight-only table, dequantised by ``embedding_byte`` / ``embedding_4bit``);
- ``xnnpack-dynamic``: torchao's ``Int8DynamicActivationIntxWeightConfig`` on the
  linear layers (int8 activations quantised per row at run time), delegated to XNNPACK.

Also prints each program's size and batch-1 latency (median of ``--repeats``).

Study script; it produced the first table of ``benchmarks/RESULTS_export.md`` (quantisation through
torchao + ExecuTorch kernels), on the ML-100K main job's MEmCom-16x model:

    .venv/bin/python scripts/studies/probe_quant_linears.py --checkpoint runs/main/runs/memcom_r16_s0_lr0.05 --repeats 30
"""

import argparse
import os
import statistics
import tempfile
import time

import torch
from torch import nn

from memcom_torchrec.export import build_slim_model, load_pte, load_trained_model, run_pte, write_programs
from memcom_torchrec.export.slim import DTYPES, INT4, ScalarTable, example_inputs, half_buffer


def dynamic_linears(model: nn.Module, dtype: str):
    """The slim model with torchao-quantised tables and XNNPACK-style dynamically quantised linear layers."""
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_api import (
        Int8DynamicActivationIntxWeightConfig,
        IntxWeightOnlyConfig,
        MappingType,
        quantize_,
    )

    slim = build_slim_model(model)
    weight_dtype = torch.int4 if dtype == INT4 else torch.int8
    quantize_(slim, IntxWeightOnlyConfig(weight_dtype=weight_dtype, granularity=PerAxis(0),
                                         mapping_type=MappingType.ASYMMETRIC),
              filter_fn=lambda m, fqn: isinstance(m, nn.Embedding))
    group = PerGroup(32) if dtype == INT4 else PerAxis(0)
    quantize_(slim, Int8DynamicActivationIntxWeightConfig(weight_dtype=weight_dtype, weight_granularity=group),
              filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
    for module in slim.modules():
        if isinstance(module, ScalarTable):
            half_buffer(module, "weight")
    return slim


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--repeats", type=int, default=100)
    args = p.parse_args()
    torch.set_num_threads(1)
    model, _ = load_trained_model(args.checkpoint)
    out = tempfile.mkdtemp(prefix="probe_quant_")
    print("| dtype | linear layers | .pte bytes | max abs diff .pte vs eager (batches 1, 4, 37) | max |score| "
          "| latency ms (batch 1) |\n|---|---|---:|---:|---:|---:|")
    for dtype in [d for d in DTYPES if d != "fp32"]:
        for name, slim in (("weight-only", build_slim_model(model, dtype)), ("xnnpack-dynamic", dynamic_linears(model, dtype))):
            res = write_programs(slim, os.path.join(out, f"{dtype}_{name}.pte"), "xnnpack", pt2=None, max_batch=64,
                                 dtype=dtype)
            method = load_pte(res.pte)
            worst, scale = 0.0, 0.0
            for b, seed in ((1, 0), (4, 1), (37, 2)):
                x = example_inputs(slim, b, seed=seed)
                want = slim(*x)
                worst = max(worst, float((run_pte(method, x) - want).abs().max()))
                scale = max(scale, float(want.abs().max()))
            x = example_inputs(slim, 1, seed=5)
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                run_pte(method, x)
                times.append((time.perf_counter() - t) * 1e3)
            print(f"| {dtype} | {name} | {res.pte_bytes:,} | {worst:.2e} | {scale:.1f} | {statistics.median(times):.3f} |")


if __name__ == "__main__":
    main()
