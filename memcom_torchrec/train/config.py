"""``TrainConfig``: everything a training run varies, one command-line flag per field.

A plain dataclass, importable without torch: the torchx components in ``launch/``
check pass-through trainer flags with ``train_flags()`` on machines that only
have TorchX.
"""

from dataclasses import dataclass, fields
from typing import Dict, get_origin

from memcom_torchrec.models.config import ModelConfig

# What memcom_clustered clusters (see TrainConfig.cluster_vectors).
CLUSTER_VECTORS = ("table", "output")


@dataclass
class TrainConfig(ModelConfig):
    """Everything a training run varies: the model's shape (``ModelConfig``) and how it is trained.

    Args:
        data_dir (str): prepared dataset (``memcom-data prepare``).
        out_dir (str): run directory (checkpoints, metrics.json).
        history_len (int): items of history fed to the model.
        batch_size (int): samples per rank per step.
        epochs (int): maximum epochs.
        embedding_optimizer (str): fused optimizer of the tables (and of MEmCom's ``w``).
        embedding_lr (float): its learning rate.
        dense_lr (float): Adam learning rate of the dense layers.
        patience (int): early stopping: epochs without validation nDCG@k gain.
        eval_batch_size (int): samples per rank per evaluation step.
        checkpoint_every (int): steps between checkpoints (0: at epoch ends only).
        keep_checkpoints (int): complete checkpoints kept.
        max_steps (int): stop after this many steps in all (0: no limit; for tests).
        seed (int): seed of initialisation and shuffling.
        device (str): auto | cpu | cuda.
        num_workers (int): DataLoader workers per rank.
        sharding_type (str): force a sharding type on the tables ("" lets the planner choose).
        k (int): cut-off of nDCG@k / HR@k.
        eval_users (int): rank only the first ``eval_users`` users of each
            evaluation split (about ``eval_users / world`` per rank, whole
            batches; 0: every user). A fixed sample, for catalogues too large
            to rank every user against (the 2M-item scale run).
        warmup_epochs (int): epochs of the warm-up method before a method with a
            learned assignment (``memcom_clustered``) is clustered and trained.
        cluster_vectors (str): what ``memcom_clustered`` clusters: ``table`` (the
            warm-up's item vectors) or ``output`` (the warm-up classifier's output
            rows, one per item: a scorer with an ``output_layer``, ``linear``). ``U`` and ``w`` start
            from the warm-up's item vectors either way.
        teacher (str): a trained ``next_item`` run (or checkpoint) to distil from ("": none).
            It is loaded frozen and sharded in the same processes; its logits are computed
            per batch and never stored. Same dataset (catalogue) and history length.
        distill_alpha (float): ``a`` in ``(1 - a) CE(student, target) + a T^2 KL(softmax(teacher / T)
            || softmax(student / T))``, in [0, 1].
        distill_temperature (float): ``T`` above, > 0.
        init_from (str): a run (or checkpoint) of the same model whose weights start this run
            (fine-tuning, e.g. ``--qat`` after a converged float run); its optimizer and training
            state are not carried over ("": a fresh initialisation).
        qat (str): quantisation-aware training for the dtype the model will be exported at,
            ``int8``, ``int4`` or ``int4_row`` ("": none): every step, validation and test see the export's grid
            (``train.qat``).

    The model fields (``model``, ``method``, ``compression_ratio``, ``compressed_tables``,
    ``embedding_dim``, ``hidden``, ``dropout``, ``num_negatives``) are documented in ``ModelConfig``.
    """

    data_dir: str = "data/ml-100k"
    out_dir: str = "runs/default"
    history_len: int = 10
    batch_size: int = 512
    epochs: int = 12
    embedding_optimizer: str = "rowwise_adagrad"
    embedding_lr: float = 0.05
    dense_lr: float = 1e-3
    patience: int = 3
    eval_batch_size: int = 1024
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    max_steps: int = 0
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    sharding_type: str = ""
    k: int = 10
    eval_users: int = 0
    warmup_epochs: int = 3
    cluster_vectors: str = "table"
    teacher: str = ""
    distill_alpha: float = 0.5
    distill_temperature: float = 2.0
    init_from: str = ""
    qat: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise ValueError(f"--distill-alpha {self.distill_alpha} is outside [0, 1]")
        if not self.distill_temperature > 0.0:
            raise ValueError(f"--distill-temperature {self.distill_temperature} must be > 0")
        if self.qat:
            from memcom_torchrec.modules.quant_grid import INTEGER_DTYPES  # torch: only when QAT is asked for

            if self.qat not in INTEGER_DTYPES:
                raise ValueError(f"--qat '{self.qat}': choose one of {list(INTEGER_DTYPES)} (the export dtype), "
                                 "or leave it empty")
        if self.teacher and self.model != "next_item":
            raise ValueError(f"--teacher needs --model next_item (the student's logits over the catalogue), "
                             f"not '{self.model}'")
        if self.cluster_vectors not in CLUSTER_VECTORS:
            raise ValueError(f"unknown --cluster-vectors '{self.cluster_vectors}'; choose one of {list(CLUSTER_VECTORS)}")
        if self.cluster_vectors == "output" and not self.scorer_spec.output_layer:
            raise ValueError(
                "--cluster-vectors output needs an output layer with one row per item: --model next_item --scorer linear"
            )


def train_flags() -> Dict[str, str]:
    """``--flag`` -> type of every ``TrainConfig`` field (``int``, ``float``, ``str``, ``bool``, ``list``)."""
    return {
        "--" + f.name.replace("_", "-"): "list" if get_origin(f.type) is list else f.type.__name__
        for f in fields(TrainConfig)
    }
