"""Checkpoint -> unsharded model -> slim model -> ``torch.export`` (.pt2) and ExecuTorch (.pte).

ExecuTorch is imported lazily: loading checkpoints, building slim models and
``torch.export`` work without it (``pip install 'memcom_torchrec[export]'``).
"""

import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
from torch.export import Dim, ExportedProgram

from memcom_torchrec.export.slim import (
    DTYPES,
    FP32,
    SlimModel,
    build_slim_model,
    dense_bytes,
    embedding_bytes,
    example_inputs,
    state_bytes,
)
from memcom_torchrec.models.builder import load_trained_model
from memcom_torchrec.quiet import native_stderr_filtered

PORTABLE, XNNPACK = "portable", "xnnpack"
BACKENDS = (PORTABLE, XNNPACK)
DEFAULT_MAX_BATCH = 1024
# A pair-network scorer's working memory (``mlp``: ``Scorer.pair_network``) is ``batch x num_items x d``
# floats, planned for the largest batch: its programs default to small batches (a phone asks for
# one user at a time).
DEFAULT_MAX_BATCH_PAIR_SCORER = 32
DEFAULT_MAX_HISTORY = 64


def default_max_batch(slim: SlimModel) -> int:
    """The batch bound a program of ``slim`` gets unless told otherwise."""
    return DEFAULT_MAX_BATCH_PAIR_SCORER if slim.scorer_spec.pair_network else DEFAULT_MAX_BATCH


# ---------------------------------------------------------------------------
# torch.export / ExecuTorch
# ---------------------------------------------------------------------------
def export_program(
    slim: SlimModel,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_history: int = DEFAULT_MAX_HISTORY,
) -> ExportedProgram:
    """``torch.export`` of a slim model with bounded dynamic shapes.

    ExecuTorch plans memory for the upper bounds: ``batch <= max_batch`` rows and
    ``len(history_ids) <= max_batch * max_history`` ids in all.

    Args:
        slim (SlimModel): the model.
        max_batch (int): largest batch.
        max_history (int): largest mean history per row (bounds the id count).

    Returns:
        ExportedProgram: inputs ``(history_ids, history_lengths[, user_ids])`` (``slim.input_names``).
    """
    if max_batch < 2 or max_history < 1:
        raise ValueError(f"need max_batch >= 2 and max_history >= 1, got {max_batch}, {max_history}")
    batch = Dim("batch", min=1, max=max_batch)
    ids = Dim("history_ids", min=0, max=max_batch * max_history)
    sample = example_inputs(slim, batch=3)
    shapes = ({0: ids}, {0: batch}, {0: batch})[: len(sample)]
    return torch.export.export(slim.eval(), sample, dynamic_shapes=shapes, strict=False)


def _register_quantized_kernels() -> None:
    """Registers ExecuTorch's ``quantized_decomposed`` kernels (embedding_byte, embedding_4bit, ...)."""
    import executorch.kernels.quantized  # noqa: F401


def _fuse_quantized_embeddings(program: ExportedProgram) -> None:
    """ExecuTorch's quant fusion (``dequantize_affine`` + ``embedding`` -> ``embedding_byte`` / ``_4bit``),
    then constant propagation that folds the weight packing but keeps every table lookup a runtime op.

    Plain ``quant_fusion_and_const_prop_pass`` also folds the scorers' whole-table lookups
    (``embedding(arange(m))``, constant inputs only) into float32 constants: the program would
    store every table a second time, dequantised (measured on ML-100K: 56 KB of constants for an
    8.7 KB int8 table). Skipping ``arange`` and dtype casts keeps them at runtime.
    """
    from executorch.exir.dialects._ops import ops as exir_ops
    from executorch.exir.passes.constant_prop_pass import constant_prop_pass
    from executorch.exir.passes.quant_fusion_pass import QuantFusionPass, _get_node_value_dict

    QuantFusionPass(_fix_node_meta_val=True, node_value_dict=_get_node_value_dict(program))(program.graph_module)
    skip = {
        exir_ops.edge.aten.arange.start_step,
        exir_ops.edge.aten.arange.default,
        exir_ops.edge.dim_order_ops._to_dim_order_copy.default,
        exir_ops.edge.aten._to_copy.default,
    }
    constant_prop_pass(program, custom_skip_targets=skip)


def lower(program: ExportedProgram, backend: str = XNNPACK):  # pyre-ignore
    """ExecuTorch program of an exported program.

    Args:
        program (ExportedProgram): from ``export_program``.
        backend (str): ``"xnnpack"`` (XNNPACK delegates what it supports, the rest
            runs on portable kernels) or ``"portable"`` (portable kernels only).

    Quantised programs (torchao's ``dequantize_affine`` + ``embedding``) go through
    ExecuTorch's quant-fusion pass, which turns each such pair into one
    ``quantized_decomposed::embedding_byte`` / ``embedding_4bit`` call on the packed
    table (linear layers of a quantised slim model are such tables too: ``quantize.DequantLinear``);
    XNNPACK takes float linear layers.

    Returns:
        ExecutorchProgramManager: ``.buffer`` is the ``.pte`` file's bytes.
    """
    _register_quantized_kernels()
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend '{backend}'; choose one of {list(BACKENDS)}")
    partitioners = []
    if backend == XNNPACK:
        from executorch.backends.xnnpack.partition.config.gemm_configs import LinearConfig
        from executorch.backends.xnnpack.partition.config.quant_affine_configs import (
            ChooseQParamsAffineConfig,
            DeQuantizeAffineConfig,
            QuantizeAffineConfig,
        )
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        # XNNPACK takes the linear layers only (float, or dynamically quantised as in
        # scripts/studies/probe_quant_linears.py, hence the quant-affine configs): with every
        # op delegated, a broadcast multiply [B, n] * [1, n] returned wrong scores once a
        # method had run at another batch size (measured: 10.4 off after a batch of 1).
        partitioners = [XnnpackPartitioner(
            configs=[LinearConfig, ChooseQParamsAffineConfig, QuantizeAffineConfig, DeQuantizeAffineConfig]
        )]
    # torchao's dequantize_affine is not a core ATen op until the fusion pass replaces it
    edge = to_edge_transform_and_lower(
        program, partitioner=partitioners, compile_config=EdgeCompileConfig(_check_ir_validity=False)
    )
    _fuse_quantized_embeddings(edge.exported_program())
    return edge.to_executorch()


def program_operators(et_program) -> List[str]:  # pyre-ignore
    """Operators a lowered program calls, as ``namespace::name.overload`` (sorted, unique)."""
    names = set()
    for plan in et_program.executorch_program.execution_plan:
        for op in plan.operators:
            names.add(f"{op.name}.{op.overload}" if op.overload else op.name)
    return sorted(names)


def program_delegates(et_program) -> List[str]:  # pyre-ignore
    """Backend ids the program delegates to (e.g. ``XnnpackBackend``)."""
    return sorted({d.id for plan in et_program.executorch_program.execution_plan for d in plan.delegates})


def unsupported_operators(et_program) -> Tuple[List[str], List[str]]:  # pyre-ignore
    """Operators and backends of a program that ExecuTorch's runtime in this environment lacks.

    Returns:
        Tuple[List[str], List[str]]: missing operators, missing backends (both empty when it runs).
    """
    from executorch.extension.pybindings import portable_lib

    _register_quantized_kernels()
    ops = set(portable_lib._get_operator_names())
    backends = set(portable_lib._get_registered_backend_names())
    return (
        [o for o in program_operators(et_program) if o not in ops],
        [b for b in program_delegates(et_program) if b not in backends],
    )


@dataclass
class ExportResult:
    """What ``export_checkpoint`` wrote and measured.

    Args:
        pte (str): the ExecuTorch program.
        pt2 (Optional[str]): the ``torch.export`` program (``torch.export.load``).
        backend (str): ``xnnpack`` or ``portable``.
        dtype (str): ``fp32``, ``int8`` or ``int4``.
        pte_bytes (int): size of ``pte``.
        pt2_bytes (int): size of ``pt2`` (0 if not written).
        state_bytes (int): parameters + buffers of the slim model.
        embedding_bytes (int): its embedding tables (``w`` included).
        dense_bytes (int): its linear layers and item biases.
        kind (str): model and scorer, e.g. ``next_item/tied``.
        operators (List[str]): operators the ``.pte`` calls.
        delegates (List[str]): backends it delegates to.
        method (str): training method of the checkpoint.
        max_batch (int): batch bound.
        max_history (int): history-ids-per-row bound.
        parity_max_abs_diff (float): largest |.pte - eager slim model| over the
            parity batches (sizes 1, 4 and 37 within ``max_batch``, empty histories
            included); for int8/int4 the eager model is the quantised twin (``quantize_slim``).
    """

    pte: str
    pt2: Optional[str]
    backend: str
    dtype: str
    pte_bytes: int
    pt2_bytes: int
    state_bytes: int
    embedding_bytes: int
    dense_bytes: int = 0
    kind: str = ""
    operators: List[str] = field(default_factory=list)
    delegates: List[str] = field(default_factory=list)
    method: str = ""
    max_batch: int = DEFAULT_MAX_BATCH
    max_history: int = DEFAULT_MAX_HISTORY
    parity_max_abs_diff: float = float("nan")


PARITY_BATCHES = (1, 4, 37)


@torch.no_grad()
def parity_check(slim: SlimModel, pte: str, max_batch: int = DEFAULT_MAX_BATCH) -> float:
    """Runs the written ``.pte`` through ExecuTorch's runtime against the eager slim model.

    Returns:
        float: the largest absolute difference of the logits over ``PARITY_BATCHES``.
    """
    method = load_pte(pte)
    worst = 0.0
    for i, batch in enumerate(b for b in PARITY_BATCHES if b <= max_batch):
        inputs = example_inputs(slim, batch=batch, seed=i)
        worst = max(worst, float((run_pte(method, inputs) - slim(*inputs)).abs().max()))
    return worst


def write_programs(
    slim: SlimModel,
    out: str,
    backend: str = XNNPACK,
    pt2: Optional[str] = "",
    max_batch: Optional[int] = None,
    max_history: int = DEFAULT_MAX_HISTORY,
    dtype: str = FP32,
    method: str = "",
) -> ExportResult:
    """Exports a slim model to ``out`` (.pte) and ``pt2`` (default: ``out`` with ``.pt2``; None: skip).

    ``max_batch`` None: ``default_max_batch(slim)``.
    """
    max_batch = max_batch or default_max_batch(slim)
    program = export_program(slim, max_batch, max_history)
    et = lower(program, backend)
    missing_ops, missing_backends = unsupported_operators(et)
    if missing_ops or missing_backends:
        raise RuntimeError(
            f"the lowered program needs operators {missing_ops} / backends {missing_backends} "
            "that this ExecuTorch runtime lacks"
        )
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "wb") as f:
        et.write_to_file(f)
    pt2_path = None
    if pt2 is not None:
        pt2_path = pt2 or os.path.splitext(out)[0] + ".pt2"
        torch.export.save(program, pt2_path)
    return ExportResult(
        pte=out,
        pt2=pt2_path,
        backend=backend,
        dtype=dtype,
        pte_bytes=os.path.getsize(out),
        pt2_bytes=os.path.getsize(pt2_path) if pt2_path else 0,
        state_bytes=state_bytes(slim),
        embedding_bytes=embedding_bytes(slim),
        dense_bytes=dense_bytes(slim),
        kind=slim.kind,
        operators=program_operators(et),
        delegates=program_delegates(et),
        method=method,
        max_batch=max_batch,
        max_history=max_history,
        parity_max_abs_diff=parity_check(slim, out, max_batch),
    )


def export_checkpoint(
    checkpoint: str,
    out: str,
    dtype: str = FP32,
    backend: str = XNNPACK,
    pt2: Optional[str] = "",
    max_batch: Optional[int] = None,
    max_history: int = DEFAULT_MAX_HISTORY,
) -> ExportResult:
    """Checkpoint -> ``.pte`` (ExecuTorch) and ``.pt2`` (``torch.export``).

    Args:
        checkpoint (str): run directory, checkpoint root or checkpoint directory.
        out (str): path of the ``.pte``.
        dtype (str): ``fp32``, ``int8`` or ``int4``.
        backend (str): ``xnnpack`` or ``portable``.
        pt2 (Optional[str]): path of the ``.pt2`` ("" : next to ``out``; None: none).
        max_batch (Optional[int]): largest batch the program accepts (None: ``default_max_batch``).
        max_history (int): bound on history ids per row (on average).

    Returns:
        ExportResult: paths, sizes, operators.

    Example::

        r = export_checkpoint("runs/ml100k_memcom", "model.pte", dtype="int8")
        print(r.pte_bytes, r.operators)
    """
    if dtype not in DTYPES:  # before any work
        raise ValueError(f"unknown dtype '{dtype}'; choose one of {list(DTYPES)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend '{backend}'; choose one of {list(BACKENDS)}")
    model, meta = load_trained_model(checkpoint)
    slim = build_slim_model(model, dtype)
    return write_programs(
        slim, out, backend, pt2, max_batch, max_history, dtype=dtype, method=str(meta["config"].get("method", ""))
    )


def load_pte(path_or_bytes):  # pyre-ignore
    """The ``forward`` method of a ``.pte`` (path or bytes), loaded with ``executorch.runtime``.

    (``executorch.runtime``, not ``portable_lib._load_for_executorch_from_buffer``: in
    executorch 1.4.1 the latter fails with ``std::bad_alloc`` on a second call of these programs.)
    """
    from executorch.runtime import Runtime

    _register_quantized_kernels()
    data = bytes(path_or_bytes) if isinstance(path_or_bytes, (bytes, bytearray)) else path_or_bytes
    # the runtime's thread pool probes the CPU when it starts (loading a delegated program or running
    # the first one) and prints what it read
    with native_stderr_filtered("executorch-load"):
        return Runtime.get().load_program(data).load_method("forward")


def run_pte(method, inputs: Sequence[torch.Tensor]) -> torch.Tensor:  # pyre-ignore
    """Scores of a loaded ``.pte`` (``load_pte``) for ``(history_ids, history_lengths[, user_ids])``.

    Raises:
        RuntimeError: the program failed (e.g. an id out of range: see ``slim``).
    """
    with native_stderr_filtered("executorch-execute"):
        return method.execute([t.long().contiguous() for t in inputs])[0].clone()
