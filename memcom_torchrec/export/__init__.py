"""Export for phones and servers: a slim single-device module, ``torch.export`` and ExecuTorch programs.

Depends on ``memcom_torchrec.models`` and ``modules`` only (never on ``train``; nothing depends on it).
ExecuTorch is an optional extra: ``pip install 'memcom_torchrec[export]'``.
"""

from memcom_torchrec.export.lowering import (
    BACKENDS,
    ExportResult,
    export_checkpoint,
    export_program,
    load_pte,
    lower,
    program_operators,
    run_pte,
    unsupported_operators,
    write_programs,
)
from memcom_torchrec.models.builder import load_trained_model, resolve_checkpoint
from memcom_torchrec.export.slim import (
    DTYPES,
    SlimLookup,
    SlimModel,
    build_slim_model,
    dense_bytes,
    embedding_bytes,
    kjt_to_inputs,
    quantize_slim,
    segment_sum,
    state_bytes,
)

__all__ = [
    "BACKENDS",
    "DTYPES",
    "ExportResult",
    "SlimLookup",
    "SlimModel",
    "build_slim_model",
    "dense_bytes",
    "embedding_bytes",
    "export_checkpoint",
    "export_program",
    "kjt_to_inputs",
    "load_pte",
    "load_trained_model",
    "lower",
    "program_operators",
    "quantize_slim",
    "resolve_checkpoint",
    "run_pte",
    "segment_sum",
    "state_bytes",
    "unsupported_operators",
    "write_programs",
]
