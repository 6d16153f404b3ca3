"""Choosing the stored assignments of the MEmCom-family variants before training.

- ``"frequency"`` tables: the cells come from training-split counts
  (``modules.assignment.frequency_assignment``); every rank computes the same
  integer counts and the same stable sort, and sets them on its sharded module.
- ``"clustered"`` tables (a method with a ``warmup_method``): the warm-up method
  is trained first at the same ratio (``warmup_epochs``, its own run directory
  ``<out_dir>/warmup``); rank 0 rebuilds it unsharded, embeds every entity,
  clusters them (``clustered_assignment``) and writes the variant's starting
  point (``<out_dir>/cluster_init``: the cells, ``U`` and ``w`` fitted to them,
  and every other tensor with the warm-up's shape taken from it, e.g. the dense
  layers) as a DCP checkpoint, which every rank then loads into its sharded model.

The assignment is fixed before the model trains and never moves entities
between ranks afterwards (see ``distributed.memcom_embeddingbag``).
"""

import logging
import os
from dataclasses import asdict, replace
from typing import Dict, List

import torch
import torch.distributed as dist
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from memcom_torchrec.data.manifest import ITEM, USER
from memcom_torchrec.eval.popularity import item_counts
from memcom_torchrec.models.builder import build_model, load_trained_model
from memcom_torchrec.models.checkpoint import latest_checkpoint, save_checkpoint
from memcom_torchrec.modules.assignment import clustered_assignment, frequency_assignment, line_fit_residual
from memcom_torchrec.modules.memcom_configs import CLUSTERED, FREQUENCY
from memcom_torchrec.modules.methods import get_method
from memcom_torchrec.modules.mixed_dim_configs import MixedDimEmbeddingBagConfig, frequency_slots
from memcom_torchrec.train.config import TrainConfig

logger: logging.Logger = logging.getLogger(__name__)

# The training-split column whose counts rank a table's entities.
COUNT_COLUMNS = {"item": ITEM, "user": USER}
CLUSTER_INIT = "cluster_init"
WARMUP = "warmup"


def stored_tables(tables: List[EmbeddingBagConfig], assignment: str) -> List[EmbeddingBagConfig]:
    """The tables whose stored assignment is of kind ``assignment`` (MEmCom's variants, mixed-dimension)."""
    return [t for t in tables if getattr(t, "stores_assignment", False) and t.assignment == assignment]


def collection_of(model: nn.Module, table: str, method: str = "set_assignment") -> nn.Module:
    """The (sharded or unsharded) collection of ``model`` that holds ``table`` and has ``method``.

    Raises:
        ValueError: no such collection.
    """
    for module in model.modules():
        configs = getattr(module, "embedding_bag_configs", None)
        if hasattr(module, method) and callable(configs) and table in {t.name for t in configs()}:
            return module
    raise ValueError(f"no collection of the model holds table '{table}'")


def frequency_cells(data_dir: str, config: EmbeddingBagConfig) -> torch.Tensor:
    """A ``"frequency"`` table's cells (a mixed-dimension table's slots) from the training split's counts.

    Raises:
        ValueError: the table is neither ``item`` nor ``user`` (no count column).
    """
    column = COUNT_COLUMNS.get(config.name)
    if column is None:
        raise ValueError(f"table '{config.name}': no training-split column to count for a frequency head")
    counts = item_counts(data_dir, column)
    if isinstance(config, MixedDimEmbeddingBagConfig):  # slot r: the r-th most frequent entity (ties by id)
        return frequency_slots(counts)
    return frequency_assignment(counts, config)


def set_frequency_assignments(cfg: TrainConfig, model: nn.Module, tables: List[EmbeddingBagConfig]) -> None:
    """Sets every ``"frequency"`` table's cells (the same on every rank)."""
    for t in stored_tables(tables, FREQUENCY):
        collection_of(model, t.name).set_assignment(t.name, frequency_cells(cfg.data_dir, t))


@torch.no_grad()
def entity_vectors(collection: nn.Module, config: EmbeddingBagConfig, chunk: int = 65536) -> torch.Tensor:
    """Every entity's vector of one table of an unsharded collection (``n x d``), one id per bag."""
    features = [f for t in collection.embedding_bag_configs() for f in (t.feature_names or [t.name])]
    feature = (config.feature_names or [config.name])[0]
    out = []
    for start in range(0, config.num_embeddings, chunk):
        ids = torch.arange(start, min(start + chunk, config.num_embeddings))
        lengths = torch.cat([torch.ones_like(ids) if f == feature else torch.zeros_like(ids) for f in features])
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=features, values=ids, lengths=lengths)
        out.append(collection(kjt)[feature])
    return torch.cat(out)


def clustered_start(cfg: TrainConfig, warmup_checkpoint: str, num_users: int, num_items: int) -> Dict[str, torch.Tensor]:
    """The ``"clustered"`` model's starting state from a trained warm-up (unsharded, CPU).

    Returns:
        Dict[str, torch.Tensor]: the variant model's full ``state_dict``.
    """
    warm, _ = load_trained_model(warmup_checkpoint)
    model, tables = build_model(cfg, num_users, num_items, torch.device("cpu"), seed=cfg.seed)
    state = model.state_dict()
    for key, value in warm.state_dict().items():  # dense layers, plain tables: the warm-up's
        if key in state and state[key].shape == value.shape and state[key].dtype == value.dtype:
            state[key] = value
    model.load_state_dict(state)
    for t in stored_tables(tables, CLUSTERED):
        fit = entity_vectors(collection_of(warm, t.name, "dense_tables"), t)
        if cfg.cluster_vectors == "output" and t.name == "item":  # the classifier's row of each item
            cells, U, w = clustered_assignment(warm.model.output.weight.detach(), t, seed=cfg.seed, fit_vectors=fit)
        else:
            cells, U, w = clustered_assignment(fit, t, seed=cfg.seed)
        collection = collection_of(model, t.name)
        collection.set_assignment(t.name, cells)
        if t.num_hashes == 2:  # the hashed row starts silent: the start is the clustered fit
            w = torch.stack([w, torch.zeros_like(w)], dim=1)
        collection.set_memcom_table(t.name, U, w)
        logger.info("table '%s': %d entities clustered on their %s vectors into %d rows (capacity %d) from %s",
                    t.name, t.num_embeddings, cfg.cluster_vectors, t.num_buckets, t.hash_columns, warmup_checkpoint)
        hashed = torch.arange(t.num_embeddings) % t.num_buckets  # MEmCom's own rows, for comparison
        logger.info("table '%s': %d lines miss %.1f%% of the warm-up vectors' energy with the clustered rows, "
                    "%.1f%% with MEmCom's i mod m", t.name, t.num_buckets,
                    100 * line_fit_residual(fit, cells % t.num_buckets, t.num_buckets),
                    100 * line_fit_residual(fit, hashed, t.num_buckets))
    return model.state_dict()


def clustered_init(cfg: TrainConfig, rank: int, num_users: int, num_items: int, train_fn) -> str:  # pyre-ignore
    """Trains the warm-up, clusters and writes the starting checkpoint; a collective. Returns its path.

    Args:
        cfg (TrainConfig): the variant's run (``warmup_epochs``; the warm-up method from the registry).
        rank (int): this process's rank.
        num_users (int): users of the dataset.
        num_items (int): items of the dataset.
        train_fn: the trainer's ``train`` (runs the warm-up as a run of its own).
    """
    root = os.path.join(cfg.out_dir, CLUSTER_INIT)
    found = latest_checkpoint(root) if os.path.isdir(root) else None
    if found is not None:
        return found
    warm_cfg = replace(
        cfg, method=get_method(cfg.method).warmup_method, epochs=cfg.warmup_epochs, patience=cfg.warmup_epochs,
        out_dir=os.path.join(cfg.out_dir, WARMUP), checkpoint_every=0,
    )
    result = train_fn(warm_cfg)
    holder: List[Dict[str, torch.Tensor]] = [{}]
    if rank == 0:
        if result.best_checkpoint is None:
            raise ValueError(f"the warm-up run {warm_cfg.out_dir} left no best checkpoint to cluster")
        holder[0] = clustered_start(cfg, result.best_checkpoint, num_users, num_items)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(holder, src=0)
    model, _ = build_model(cfg, num_users, num_items, torch.device("cpu"), seed=cfg.seed)
    model.load_state_dict(holder[0])
    return save_checkpoint(root, 0, model, meta={"config": asdict(cfg), "warmup": asdict(warm_cfg)}, keep=1)
