"""Data pipeline: interaction logs and MovieLens to Parquet, streamed per rank as KJT batches."""

from memcom_torchrec.data.errors import DataError
from memcom_torchrec.data.manifest import SPLITS, read_manifest
from memcom_torchrec.data.movielens import prepare_movielens
from memcom_torchrec.data.prepare import PrepareConfig, prepare_interactions
from memcom_torchrec.data.reader import (
    EXCLUDE_KEY,
    PAD_LABEL,
    SPARSE_KEYS,
    Batch,
    InteractionBatchReader,
    make_dataloader,
    pad_batch,
    table_to_batch,
)
from memcom_torchrec.data.synthetic import SynthConfig, generate_synthetic

__all__ = [
    "EXCLUDE_KEY",
    "PAD_LABEL",
    "SPARSE_KEYS",
    "SPLITS",
    "Batch",
    "DataError",
    "InteractionBatchReader",
    "PrepareConfig",
    "SynthConfig",
    "generate_synthetic",
    "make_dataloader",
    "pad_batch",
    "prepare_interactions",
    "prepare_movielens",
    "read_manifest",
    "table_to_batch",
]
