"""Data pipeline: interaction logs and MovieLens to Parquet, streamed per rank as KJT batches."""

from memcom_torchrec.data.errors import DataError
from memcom_torchrec.data.manifest import read_manifest
from memcom_torchrec.data.movielens import prepare_movielens
from memcom_torchrec.data.prepare import PrepareConfig, prepare_interactions
from memcom_torchrec.data.reader import Batch, InteractionBatchReader, make_dataloader, table_to_batch

__all__ = [
    "Batch",
    "DataError",
    "InteractionBatchReader",
    "PrepareConfig",
    "make_dataloader",
    "prepare_interactions",
    "prepare_movielens",
    "read_manifest",
    "table_to_batch",
]
