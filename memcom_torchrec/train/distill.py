"""Distillation from a trained model: a frozen, sharded teacher whose logits become each batch's soft targets.

The teacher is any ``next_item`` checkpoint of this project (the server-shaped model with a
user id and a linear scorer, or a phone model) trained on the same dataset with the same
history length. It is rebuilt from its own config, sharded like any model in the student's
processes, loaded from its DCP checkpoint (saved by any number of ranks) and run in eval mode
under ``torch.no_grad``: no gradient reaches it, so neither its fused nor its dense
parameters ever change. Each training batch gets the teacher's logits attached as
``Batch.soft_targets`` for its step only; the student's loss is ``models.next_item.distillation_loss``.
"""

import os
from dataclasses import dataclass
from typing import Any, Dict, List

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from memcom_torchrec.data.reader import SPARSE_KEYS, Batch
from memcom_torchrec.models.builder import build_model, model_config_of, resolve_checkpoint, table_size_of
from memcom_torchrec.models.checkpoint import load_checkpoint, read_meta
from memcom_torchrec.models.config import ModelConfig
from memcom_torchrec.models.layers import USER_FEATURE, query_features
from memcom_torchrec.train.config import TrainConfig

def feature_keys(cfg: ModelConfig) -> List[str]:
    """The batch features a model reads (``query_features``), in the reader's key order."""
    wanted = query_features(cfg.use_user_id)
    return [k for k in SPARSE_KEYS if k in wanted]


def select_features(kjt: KeyedJaggedTensor, keys: List[str]) -> KeyedJaggedTensor:
    """``kjt`` restricted to ``keys`` (itself if it has exactly those)."""
    if list(kjt.keys()) == keys:
        return kjt
    return KeyedJaggedTensor.from_jt_dict({k: kjt[k] for k in keys})


@dataclass
class TeacherSpec:
    """A checked teacher, before anything is built: where it is, its shape and its identity.

    Args:
        path (str): the checkpoint directory.
        config (ModelConfig): the teacher's model shape.
        num_users (int): rows of its user table (0 without one).
        num_items (int): rows of its item table (= logits).
        identity (Dict[str, Any]): what the student's checkpoints record (path, step, table signature).
    """

    path: str
    config: ModelConfig
    num_users: int
    num_items: int
    identity: Dict[str, Any]


def check_teacher(cfg: TrainConfig, manifest: Dict[str, Any]) -> TeacherSpec:
    """Finds and checks ``cfg.teacher`` against the student and its dataset, before any work.

    Raises:
        ValueError: no checkpoint there, not a ``next_item`` model, another catalogue or
            user count, another history length.
    """
    try:
        path = resolve_checkpoint(cfg.teacher)
    except ValueError as e:
        raise ValueError(f"--teacher: {e}") from None
    meta = read_meta(path)
    tcfg = model_config_of(meta, path)
    if tcfg.model != "next_item":
        raise ValueError(f"--teacher {path}: a '{tcfg.model}' model; distillation needs a next_item teacher "
                         "(logits over the whole catalogue)")
    num_items = table_size_of(meta, "item", path)
    if num_items != int(manifest["num_items"]):
        raise ValueError(f"--teacher {path}: its catalogue has {num_items} items, this dataset "
                         f"{manifest['num_items']}: a teacher must be trained on the same dataset")
    num_users = table_size_of(meta, "user", path) if tcfg.use_user_id else 0
    if tcfg.use_user_id and num_users != int(manifest["num_users"]):
        raise ValueError(f"--teacher {path}: its user table has {num_users} rows, this dataset "
                         f"{manifest['num_users']} users")
    history = int(meta.get("config", {}).get("history_len", -1))
    if history != cfg.history_len:
        raise ValueError(f"--teacher {path}: trained with --history-len {history}, the student has "
                         f"{cfg.history_len}; use the same history length")
    identity = {"path": os.path.abspath(path), "step": meta.get("step"), "tables": meta.get("tables", {})}
    return TeacherSpec(path=path, config=tcfg, num_users=num_users, num_items=num_items, identity=identity)


class Teacher:
    """A loaded, frozen teacher in this process group.

    Args:
        spec (TeacherSpec): from ``check_teacher``.
        model (nn.Module): the teacher, sharded and loaded (``load_teacher``).
        student_keys (List[str]): the features the student reads.
    """

    def __init__(self, spec: TeacherSpec, model: nn.Module, student_keys: List[str]) -> None:
        self.spec = spec
        self.model = model
        self.keys = feature_keys(spec.config)
        self.student_keys = student_keys

    @property
    def needs_user_id(self) -> bool:
        """Whether batches must carry the user id (the teacher reads it)."""
        return USER_FEATURE in self.keys

    @torch.no_grad()
    def attach(self, batch: Batch) -> Batch:
        """The student's batch: its own features, and the teacher's logits as ``soft_targets``.

        Collective when the teacher is sharded: every rank calls it once per step, in step.
        """
        kjt = batch.sparse_features
        _, (_, logits, _) = self.model(Batch(sparse_features=select_features(kjt, self.keys), labels=batch.labels))
        return Batch(sparse_features=select_features(kjt, self.student_keys), labels=batch.labels,
                     exclude=batch.exclude, soft_targets=logits)


def load_teacher(spec: TeacherSpec, student: TrainConfig, shard) -> Teacher:  # pyre-ignore[2]: shard_model
    """Builds the teacher on ``meta``, shards it with ``shard(cfg, model, tables)`` and loads its checkpoint.

    Args:
        spec (TeacherSpec): from ``check_teacher``.
        student (TrainConfig): the student's config (its features; the sharding options).
        shard: the trainer's ``shard_model`` bound to this process group.

    Returns:
        Teacher: in eval mode, every parameter frozen.
    """
    model, tables = build_model(spec.config, spec.num_users, spec.num_items, torch.device("meta"))
    model = shard(student, model, tables)
    load_checkpoint(spec.path, model)
    model.eval()
    for p in model.parameters():
        if p.is_leaf:  # the fused tables' parameters are views of FBGEMM's buffers; attach() runs under no_grad
            p.requires_grad_(False)
    return Teacher(spec, model, feature_keys(student))
