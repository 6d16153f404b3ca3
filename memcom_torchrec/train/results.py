"""What a training run carries between steps and hands to its callers, as typed dataclasses.

- ``TrainState``: the loop's progress, saved in every checkpoint's ``meta.json``
  so a restarted run resumes exactly where it stopped;
- ``RunResult``: the run's figures, written to ``out_dir/metrics.json`` and read
  back by ``memcom-experiment`` with ``RunResult.load``. Metric fields carry no
  cut-off in their names: ``k`` says which ``@k`` they are.
"""

import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Dict, List, Mapping, Optional

METRICS_FILE = "metrics.json"


@dataclass
class EpochScore:
    """Validation after one epoch.

    Args:
        epoch (int): epoch index.
        ndcg (float): mean nDCG@k.
        hr (float): mean HR@k.
        loss (float): mean training loss of the epoch.
    """

    epoch: int
    ndcg: float
    hr: float
    loss: float


@dataclass
class TrainState:
    """Progress of the training loop (resumable).

    Args:
        epoch (int): current epoch.
        batch_in_epoch (int): batches of it already trained.
        step (int): steps in all.
        best_ndcg (float): best validation nDCG@k so far.
        best_epoch (int): epoch that reached it (-1: none yet).
        bad_epochs (int): epochs since the last improvement (early stopping).
        valid (List[EpochScore]): validation curve.
        train_seconds (float): training time so far, across restarts.
        epoch_loss_sum (float): sum of this epoch's losses so far (carried across a restart).
        epoch_batches (int): batches in that sum.
        resumed_from_steps (List[int]): steps at which the run was resumed.
    """

    epoch: int = 0
    batch_in_epoch: int = 0
    step: int = 0
    best_ndcg: float = -1.0
    best_epoch: int = -1
    bad_epochs: int = 0
    valid: List[EpochScore] = field(default_factory=list)
    train_seconds: float = 0.0
    epoch_loss_sum: float = 0.0
    epoch_batches: int = 0
    resumed_from_steps: List[int] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainState":
        """The state saved by ``asdict`` in a checkpoint's ``meta.json``.

        Raises:
            ValueError: naming fields this version does not know.
        """
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"train_state has fields {unknown} this version does not know")
        state = cls(**d)
        state.valid = [v if isinstance(v, EpochScore) else EpochScore(**v) for v in state.valid]
        return state


@dataclass
class RunResult:
    """The figures of one training run (``metrics.json``).

    Args:
        method (str): embedding method.
        target_compression_ratio (float): the ratio asked for (1 for uncompressed).
        embedding_params (int): stored embedding parameters.
        embedding_bytes (int): their bytes.
        compression_ratio (float): uncompressed parameters / stored ones, all tables.
        table_compression_ratios (Dict[str, float]): the same, per table (``TableMemory``).
        tables (Dict[str, Dict[str, Any]]): every table's ``TableMemory``.
        k (int): the cut-off of every ``@k`` metric below.
        valid_ndcg (float): best validation nDCG@k.
        test_ndcg (float): test nDCG@k of the best model.
        test_hr (float): test HR@k of the best model.
        test_users (int): users ranked on test.
        best_epoch (int): epoch of the best model (-1: none validated).
        epochs_run (int): validated epochs.
        steps (int): training steps.
        resumed_from_steps (List[int]): steps at which the run was resumed.
        train_seconds (float): training time.
        world_size (int): processes.
        valid_curve (List[EpochScore]): validation after each epoch.
        config (Dict[str, Any]): the run's ``TrainConfig``.
        best_checkpoint (Optional[str]): checkpoint of the best model.
        rank_stats (List[Dict[str, float]]): per rank, what this process
            measured (``trainer.rank_stats``): training rows/s, peak RSS,
            local embedding parameter and optimizer bytes.
        test_ndcg_se (float): standard error of ``test_ndcg`` over the test users
            (0 in files written before it was recorded).
    """

    method: str
    target_compression_ratio: float
    embedding_params: int
    embedding_bytes: int
    compression_ratio: float
    table_compression_ratios: Dict[str, float]
    tables: Dict[str, Dict[str, Any]]
    k: int
    valid_ndcg: float
    test_ndcg: float
    test_hr: float
    test_users: int
    best_epoch: int
    epochs_run: int
    steps: int
    resumed_from_steps: List[int]
    train_seconds: float
    world_size: int
    valid_curve: List[EpochScore]
    config: Dict[str, Any]
    best_checkpoint: Optional[str]
    rank_stats: List[Dict[str, float]] = field(default_factory=list)
    test_ndcg_se: float = 0.0

    def save(self, out_dir: str) -> str:
        """Writes ``out_dir/metrics.json``; returns its path."""
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, METRICS_FILE)
        with open(path, "w") as f:
            json.dump(asdict(self), f, indent=2)
        return path

    @classmethod
    def load(cls, run_dir: str) -> "RunResult":
        """Reads ``run_dir/metrics.json``.

        Raises:
            ValueError: the file is missing fields (written by an older version) or is not JSON.
        """
        path = os.path.join(run_dir, METRICS_FILE)
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        missing = sorted(required - set(d))
        if missing:
            raise ValueError(f"{path} lacks {missing} (written by another version?); rerun the run or use another out dir")
        result = cls(**{k: v for k, v in d.items() if k in names})
        result.valid_curve = [EpochScore(**v) for v in result.valid_curve]
        return result
