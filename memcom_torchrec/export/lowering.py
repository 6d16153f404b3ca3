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
    FP32,
    SlimNextItemModel,
    build_slim_model,
    embedding_bytes,
    example_inputs,
    state_bytes,
)
from memcom_torchrec.models.builder import load_trained_model

PORTABLE, XNNPACK = "portable", "xnnpack"
BACKENDS = (PORTABLE, XNNPACK)
DEFAULT_MAX_BATCH = 1024
DEFAULT_MAX_HISTORY = 64
INPUT_NAMES = ("history_ids", "history_lengths", "user_ids")


# ---------------------------------------------------------------------------
# torch.export / ExecuTorch
# ---------------------------------------------------------------------------
def export_program(
    slim: SlimNextItemModel,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_history: int = DEFAULT_MAX_HISTORY,
) -> ExportedProgram:
    """``torch.export`` of a slim model with bounded dynamic shapes.

    ExecuTorch plans memory for the upper bounds: ``batch <= max_batch`` rows and
    ``len(history_ids) <= max_batch * max_history`` ids in all.

    Args:
        slim (SlimNextItemModel): the model.
        max_batch (int): largest batch.
        max_history (int): largest mean history per row (bounds the id count).

    Returns:
        ExportedProgram: inputs ``(history_ids, history_lengths, user_ids)``.
    """
    if max_batch < 2 or max_history < 1:
        raise ValueError(f"need max_batch >= 2 and max_history >= 1, got {max_batch}, {max_history}")
    batch = Dim("batch", min=1, max=max_batch)
    ids = Dim("history_ids", min=0, max=max_batch * max_history)
    sample = example_inputs(slim, batch=3)
    return torch.export.export(
        slim.eval(), sample, dynamic_shapes=({0: ids}, {0: batch}, {0: batch}), strict=False
    )


def lower(program: ExportedProgram, backend: str = XNNPACK):  # pyre-ignore
    """ExecuTorch program of an exported program.

    Args:
        program (ExportedProgram): from ``export_program``.
        backend (str): ``"xnnpack"`` (XNNPACK delegates what it supports, the rest
            runs on portable kernels) or ``"portable"`` (portable kernels only).

    Returns:
        ExecutorchProgramManager: ``.buffer`` is the ``.pte`` file's bytes.
    """
    from executorch.exir import to_edge_transform_and_lower

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend '{backend}'; choose one of {list(BACKENDS)}")
    partitioners = []
    if backend == XNNPACK:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        partitioners = [XnnpackPartitioner()]
    return to_edge_transform_and_lower(program, partitioner=partitioners).to_executorch()


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
        dtype (str): ``fp32`` or ``compact``.
        pte_bytes (int): size of ``pte``.
        pt2_bytes (int): size of ``pt2`` (0 if not written).
        state_bytes (int): parameters + buffers of the slim model.
        embedding_bytes (int): its embedding tables.
        operators (List[str]): operators the ``.pte`` calls.
        delegates (List[str]): backends it delegates to.
        method (str): training method of the checkpoint.
        max_batch (int): batch bound.
        max_history (int): history-ids-per-row bound.
        parity_max_abs_diff (float): largest |.pte - eager slim model| over the
            parity batches (sizes 1, 4 and 37, empty histories included).
    """

    pte: str
    pt2: Optional[str]
    backend: str
    dtype: str
    pte_bytes: int
    pt2_bytes: int
    state_bytes: int
    embedding_bytes: int
    operators: List[str] = field(default_factory=list)
    delegates: List[str] = field(default_factory=list)
    method: str = ""
    max_batch: int = DEFAULT_MAX_BATCH
    max_history: int = DEFAULT_MAX_HISTORY
    parity_max_abs_diff: float = float("nan")


PARITY_BATCHES = (1, 4, 37)


@torch.no_grad()
def parity_check(slim: SlimNextItemModel, pte: str, max_batch: int = DEFAULT_MAX_BATCH) -> float:
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
    slim: SlimNextItemModel,
    out: str,
    backend: str = XNNPACK,
    pt2: Optional[str] = "",
    max_batch: int = DEFAULT_MAX_BATCH,
    max_history: int = DEFAULT_MAX_HISTORY,
    dtype: str = FP32,
    method: str = "",
) -> ExportResult:
    """Exports a slim model to ``out`` (.pte) and ``pt2`` (default: ``out`` with ``.pt2``; None: skip)."""
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
    max_batch: int = DEFAULT_MAX_BATCH,
    max_history: int = DEFAULT_MAX_HISTORY,
) -> ExportResult:
    """Checkpoint -> ``.pte`` (ExecuTorch) and ``.pt2`` (``torch.export``).

    Args:
        checkpoint (str): run directory, checkpoint root or checkpoint directory.
        out (str): path of the ``.pte``.
        dtype (str): ``fp32`` or ``compact``.
        backend (str): ``xnnpack`` or ``portable``.
        pt2 (Optional[str]): path of the ``.pt2`` ("" : next to ``out``; None: none).
        max_batch (int): largest batch the program accepts.
        max_history (int): bound on history ids per row (on average).

    Returns:
        ExportResult: paths, sizes, operators.

    Example::

        r = export_checkpoint("runs/ml100k_memcom", "model.pte", dtype="compact")
        print(r.pte_bytes, r.operators)
    """
    model, meta = load_trained_model(checkpoint)
    kind = meta["config"].get("model", "next_item")
    if kind != "next_item":
        raise ValueError(
            f"checkpoint {checkpoint}: model '{kind}' cannot be exported yet; the phone module covers the "
            "next-item classifier"
        )
    slim = build_slim_model(model, dtype)
    return write_programs(
        slim, out, backend, pt2, max_batch, max_history, dtype=dtype, method=str(meta["config"].get("method", ""))
    )


def load_pte(path_or_bytes):  # pyre-ignore
    """The ``forward`` method of a ``.pte`` (path or bytes), loaded with ``executorch.runtime``.

    (The legacy ``portable_lib._load_for_executorch_from_buffer`` module crashed with
    ``std::bad_alloc`` on the second call of these programs in executorch 1.4.1;
    ``executorch.runtime`` runs them repeatedly.)
    """
    from executorch.runtime import Runtime

    data = bytes(path_or_bytes) if isinstance(path_or_bytes, (bytes, bytearray)) else path_or_bytes
    return Runtime.get().load_program(data).load_method("forward")


def run_pte(method, inputs: Sequence[torch.Tensor]) -> torch.Tensor:  # pyre-ignore
    """Logits of a loaded ``.pte`` (``load_pte``) for ``(history_ids, history_lengths, user_ids)``.

    Raises:
        RuntimeError: the program failed (e.g. an id out of range: see ``slim``).
    """
    return method.execute([t.long().contiguous() for t in inputs])[0].clone()
