"""A model from its config, and a trained model back from its checkpoint.

A ``ModelConfig`` (``models.config``) holds what defines a model's shape (kind,
embedding method, ratio, widths). The trainer builds its model here, and the exporter rebuilds a
trained one from a checkpoint here, so ``export/`` depends on ``models/``,
never on ``train/``.
"""

import os
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType

from memcom_torchrec.models.checkpoint import latest_checkpoint, load_checkpoint, read_meta
from memcom_torchrec.models.config import ModelConfig
from memcom_torchrec.models.embeddings import EmbeddingMethodConfig, TableSpec, build_collection, table_configs
from memcom_torchrec.models.layers import CANDIDATE_FEATURE, HISTORY_FEATURE, USER_FEATURE
from memcom_torchrec.models.next_item import NextItemClassifier, NextItemTrain
from memcom_torchrec.models.ranknet import RankNet, RankNetTrain


def embedding_tables(cfg: ModelConfig, num_users: int, num_items: int) -> List[EmbeddingBagConfig]:
    """The model's item and user table configs under ``cfg``'s method and ratio.

    Raises:
        ValueError: the method cannot build a table at the ratio (e.g. QR above its maximum).
    """
    item_features = [HISTORY_FEATURE] + ([CANDIDATE_FEATURE] if cfg.scores_catalogue else [])
    specs = [TableSpec("item", num_items, item_features, PoolingType.MEAN)]
    if cfg.use_user_id:
        specs.append(TableSpec("user", num_users, [USER_FEATURE], PoolingType.SUM))
    method = EmbeddingMethodConfig(
        method=cfg.method,
        compression_ratio=cfg.compression_ratio,
        compressed_tables=tuple(cfg.compressed_tables),
        embedding_dim=cfg.embedding_dim,
    )
    return table_configs(specs, method)


def build_model(
    cfg: ModelConfig,
    num_users: int,
    num_items: int,
    device: torch.device = torch.device("meta"),
    seed: Optional[int] = None,
) -> Tuple[nn.Module, List[EmbeddingBagConfig]]:
    """The unsharded training model (the model wrapped with its loss) and its table configs.

    Args:
        cfg (ModelConfig): the model's shape.
        num_users (int): rows of the user table.
        num_items (int): rows of the item table (and logits).
        device (torch.device): where the embedding tables live (``meta`` for
            DistributedModelParallel, which materialises them sharded).
        seed (Optional[int]): seeds torch after the tables are built, so the dense
            layers' initialisation depends on the seed alone.

    Returns:
        Tuple[nn.Module, List[EmbeddingBagConfig]]: ``NextItemTrain`` or ``RankNetTrain``, and the tables.
    """
    tables = embedding_tables(cfg, num_users, num_items)
    embeddings = build_collection(tables, device=device)
    if seed is not None:
        torch.manual_seed(seed)
    shape = dict(hidden=cfg.hidden, dropout=cfg.dropout, use_user_id=cfg.use_user_id, scorer=cfg.scorer)
    if cfg.model == "ranknet":
        ranker = RankNet(embeddings, cfg.embedding_dim, num_items, **shape)
        return RankNetTrain(ranker, cfg.num_negatives), tables
    return NextItemTrain(NextItemClassifier(embeddings, cfg.embedding_dim, num_items, **shape)), tables


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory from a run directory, a checkpoint root or a checkpoint.

    Order: ``path`` itself (has ``.metadata``), ``path/LATEST``, ``path/best/LATEST``,
    ``path/checkpoints/LATEST``.

    Raises:
        ValueError: nothing loadable there.
    """
    if os.path.exists(os.path.join(path, ".metadata")):
        return path
    for root in (path, os.path.join(path, "best"), os.path.join(path, "checkpoints")):
        if os.path.exists(os.path.join(root, "LATEST")):
            found = latest_checkpoint(root)
            if found is not None:
                return found
    raise ValueError(
        f"no checkpoint at {path}: expected a checkpoint directory (with .metadata), a root with LATEST, "
        "or a run directory with best/ or checkpoints/"
    )


def model_config_of(meta: Dict[str, Any], path: str) -> ModelConfig:
    """The ``ModelConfig`` a checkpoint's ``meta.json`` records (``ValueError`` naming ``path`` otherwise)."""
    cfg = meta.get("config")
    if not isinstance(cfg, dict):
        raise ValueError(f"checkpoint {path}: meta.json has no 'config' (not written by memcom_torchrec.train?)")
    try:
        return ModelConfig.from_flags(cfg)
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint {path}: incompatible config: {e}") from None


def table_size_of(meta: Dict[str, Any], table: str, path: str) -> int:
    """Rows of ``table`` in a checkpoint's ``meta.json`` (``ValueError`` naming ``path`` if it has none)."""
    tables = meta.get("tables", {})
    for key, sig in tables.items():
        if key.split(":")[-1] == table:
            return int(sig["num_embeddings"])
    raise ValueError(f"checkpoint {path}: meta.json lists no table '{table}' (it has {sorted(tables)})")


def load_trained_model(checkpoint: str) -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuilds the unsharded model of a checkpoint on CPU and loads its weights.

    The model comes from ``meta.json``'s ``config`` (table sizes from its
    ``tables``); the DCP checkpoint, saved by any number of ranks with any
    sharding, is loaded into it in this process.

    Args:
        checkpoint (str): run directory, checkpoint root or checkpoint directory.

    Returns:
        Tuple[nn.Module, Dict[str, Any]]: the model wrapped with its loss, in eval mode, and ``meta.json``.

    Raises:
        ValueError: no checkpoint, incompatible config, missing or mismatched tables.
    """
    from torch.distributed.checkpoint.api import CheckpointException

    path = resolve_checkpoint(checkpoint)
    meta = read_meta(path)
    cfg = model_config_of(meta, path)
    num_items = table_size_of(meta, "item", path)
    num_users = table_size_of(meta, "user", path) if cfg.use_user_id else 0
    try:
        model, _ = build_model(cfg, num_users, num_items, torch.device("cpu"))
    except ValueError as e:
        raise ValueError(f"checkpoint {path}: incompatible config: {e}") from None
    try:
        load_checkpoint(path, model, local=True)
    except ValueError:
        raise
    except (RuntimeError, KeyError, CheckpointException) as e:  # DCP: tensors missing or misshapen
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise ValueError(f"checkpoint {path} does not match its config: {(lines or [''])[-1][:500]}") from e
    return model.eval(), meta
