"""Training job: config -> data -> sharded model -> fused optimizers -> loop -> eval -> checkpoints.

Runs on 1..N processes (torchrun/torchx set the env; a plain ``python -m``
run is a world of one). Embedding tables are sharded by DistributedModelParallel
onto FBGEMM fused kernels (MEmCom through ``MEmComEmbeddingBagCollectionSharder``);
the dense part is data-parallel with Adam; TorchRec's ``TrainPipelineSparseDist``
overlaps the next batch's input all-to-all with the current step.
"""

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Tuple

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.train_pipeline import TrainPipelineBase, TrainPipelineSparseDist
from torchrec.distributed.types import ShardingEnv, ShardingType
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from tqdm import tqdm

from memcom_torchrec.data import Batch, make_dataloader, pad_batch, read_manifest
from memcom_torchrec.distributed.memcom_embeddingbag import MEmComEmbeddingBagCollectionSharder
from memcom_torchrec.eval.metrics import RankingTotals, ranking_totals, target_ranks
from memcom_torchrec.models.embeddings import (
    SECOND_TABLE_SUFFIX,
    EmbeddingMethodConfig,
    TableSpec,
    build_collection,
    duplicate_features,
    table_configs,
)
from memcom_torchrec.models.next_item import HISTORY_FEATURE, USER_FEATURE, NextItemClassifier, NextItemTrain
from memcom_torchrec.models.ranknet import CANDIDATE_FEATURE, RankNet, RankNetTrain
from memcom_torchrec.modules.memory import table_memory
from memcom_torchrec.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from memcom_torchrec.train.distributed_env import init_distributed

logger: logging.Logger = logging.getLogger(__name__)

MODELS = ("next_item", "ranknet")
OPTIMIZERS = {
    "sgd": EmbOptimType.EXACT_SGD,
    "adagrad": EmbOptimType.EXACT_ADAGRAD,
    "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
    "adam": EmbOptimType.ADAM,  # CUDA only in FBGEMM
}


@dataclass
class TrainConfig:
    """Everything a training run varies.

    Args:
        data_dir (str): prepared dataset (``memcom-data prepare``).
        out_dir (str): run directory (checkpoints, metrics.json).
        model (str): ``next_item`` (softmax classifier) or ``ranknet`` (pairwise ranking).
        num_negatives (int): sampled negatives per positive (``ranknet``).
        method (str): one of ``models.embeddings.METHODS`` (uncompressed | hashing | memcom | qr,
            and the variants memcom_double | memcom_qr).
        compression_ratio (float): target ratio of the compressed tables.
        compressed_tables (List[str]): which of ``item``/``user`` are compressed.
        embedding_dim (int): ``d``.
        hidden (List[int]): MLP widths.
        dropout (float): MLP dropout.
        history_len (int): items of history fed to the model.
        batch_size (int): samples per rank per step.
        epochs (int): maximum epochs.
        embedding_optimizer (str): fused optimizer of the tables (and of MEmCom's ``w``).
        embedding_lr (float): its learning rate.
        dense_lr (float): Adam learning rate of the dense layers.
        patience (int): early stopping: epochs without validation nDCG@10 gain.
        eval_batch_size (int): samples per rank per evaluation step.
        checkpoint_every (int): steps between checkpoints (0: at epoch ends only).
        keep_checkpoints (int): complete checkpoints kept.
        max_steps (int): stop after this many steps in all (0: no limit; for tests).
        seed (int): seed of initialisation and shuffling.
        device (str): auto | cpu | cuda.
        num_workers (int): DataLoader workers per rank.
        sharding_type (str): force a sharding type on the tables ("" lets the planner choose).
        k (int): cut-off of nDCG@k / HR@k.
    """

    data_dir: str = "data/ml-100k"
    out_dir: str = "runs/default"
    model: str = "next_item"
    num_negatives: int = 4
    method: str = "memcom"
    compression_ratio: float = 16.0
    compressed_tables: List[str] = field(default_factory=lambda: ["item"])
    embedding_dim: int = 64
    hidden: List[int] = field(default_factory=lambda: [256])
    dropout: float = 0.0
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


def embedding_tables(cfg: TrainConfig, num_users: int, num_items: int) -> List[EmbeddingBagConfig]:
    """The model's item and user table configs under ``cfg``'s method and ratio.

    Raises:
        ValueError: the method cannot build a table at the ratio (e.g. QR above its maximum).
    """
    item_features = [HISTORY_FEATURE] + ([CANDIDATE_FEATURE] if cfg.model == "ranknet" else [])
    specs = [
        TableSpec("item", num_items, item_features, PoolingType.MEAN),
        TableSpec("user", num_users, [USER_FEATURE], PoolingType.SUM),
    ]
    method = EmbeddingMethodConfig(
        method=cfg.method,
        compression_ratio=cfg.compression_ratio,
        compressed_tables=tuple(cfg.compressed_tables),
        embedding_dim=cfg.embedding_dim,
    )
    return table_configs(specs, method)


def build_model(cfg: TrainConfig, num_users: int, num_items: int, device: torch.device) -> Tuple[nn.Module, List[EmbeddingBagConfig]]:
    """The unsharded training model (embeddings on ``meta``: DMP materialises them sharded)."""
    if cfg.model not in MODELS:
        raise ValueError(f"unknown model '{cfg.model}'; choose one of {list(MODELS)}")
    tables = embedding_tables(cfg, num_users, num_items)
    embeddings = build_collection(tables, device=torch.device("meta"))
    torch.manual_seed(cfg.seed)
    double = cfg.method == "memcom_double"
    if double and (cfg.model != "next_item" or list(cfg.compressed_tables) != ["item"]):
        raise ValueError("method 'memcom_double' is implemented for the next_item model with compressed_tables ['item']")
    if cfg.model == "ranknet":
        return RankNetTrain(RankNet(embeddings, cfg.embedding_dim, num_items, cfg.hidden, cfg.dropout), cfg.num_negatives), tables
    model = NextItemClassifier(embeddings, cfg.embedding_dim, num_items, cfg.hidden, cfg.dropout, second_history_table=double)
    return NextItemTrain(model), tables


def batch_transform(cfg: TrainConfig):  # pyre-ignore
    """What every batch goes through before the model: ``memcom_double`` reads a copy of the history."""
    if cfg.method != "memcom_double":
        return lambda batch: batch

    def _transform(batch: Batch) -> Batch:
        return Batch(
            sparse_features=duplicate_features(batch.sparse_features, [HISTORY_FEATURE]),
            labels=batch.labels,
            exclude=batch.exclude,
        )

    return _transform


def fused_params(cfg: TrainConfig) -> Dict[str, Any]:
    if cfg.embedding_optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown embedding_optimizer '{cfg.embedding_optimizer}'; choose one of {list(OPTIMIZERS)}")
    return {"optimizer": OPTIMIZERS[cfg.embedding_optimizer], "learning_rate": cfg.embedding_lr}


def shard_model(cfg: TrainConfig, model: nn.Module, tables: List[EmbeddingBagConfig], world: int, device: torch.device) -> DistributedModelParallel:
    """Plans and shards every embedding table onto fused kernels (never data-parallel)."""
    fp = fused_params(cfg)
    sharders = [
        MEmComEmbeddingBagCollectionSharder(fused_params=fp),
        EmbeddingBagCollectionSharder(fused_params=fp),
        EmbeddingCollectionSharder(fused_params=fp),
    ]
    types = [cfg.sharding_type] if cfg.sharding_type else [
        ShardingType.TABLE_WISE.value, ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value
    ]
    names = [t.name for t in tables] + [f"{t.name}__q" for t in tables] + [f"{t.name}__r" for t in tables]
    constraints = {n: ParameterConstraints(sharding_types=types, compute_kernels=["fused"]) for n in names}
    topology = Topology(world_size=world, compute_device=device.type)
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    pg = dist.group.WORLD
    plan = planner.collective_plan(model, sharders, pg)
    return DistributedModelParallel(
        model, env=ShardingEnv.from_process_group(pg), device=device, plan=plan, sharders=sharders
    )


def build_optimizer(cfg: TrainConfig, model: DistributedModelParallel) -> Tuple[CombinedOptimizer, KeyedOptimizerWrapper]:
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(model.named_parameters())),
        lambda params: torch.optim.Adam(params, lr=cfg.dense_lr),
    )
    return CombinedOptimizer([model.fused_optimizer, dense]), dense


def make_pipeline(cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device):
    """TorchRec's sparse-dist pipeline (next batch's input all-to-all overlapped with this step).

    The QR collection computes its inner lookups' input (quotients and
    remainders) inside its own forward, and RankNet builds its candidate KJT
    from sampled negatives, so TorchRec cannot start those input dists early:
    they run with the plain pipeline (forward, backward, step).
    """
    if cfg.method in ("qr", "memcom_qr") or cfg.model == "ranknet":
        return TrainPipelineBase(model, optimizer, device)
    return TrainPipelineSparseDist(model, optimizer, device)


@torch.no_grad()
def evaluate(cfg: TrainConfig, model: nn.Module, split: str, rank: int, world: int, device: torch.device) -> RankingTotals:
    """Sharded full-ranking evaluation: every rank ranks its users, totals are all-reduced."""
    was_training = model.training
    model.eval()
    loader = make_dataloader(
        cfg.data_dir, split, cfg.eval_batch_size, rank, world, shuffle=False, history_len=cfg.history_len,
        num_workers=cfg.num_workers,
    )
    totals = RankingTotals()
    transform = batch_transform(cfg)
    for batch in tqdm(loader, desc=f"eval {split}", disable=rank != 0, leave=False, mininterval=5.0):
        real = len(batch)
        batch = transform(pad_batch(batch, cfg.eval_batch_size)).to(device)  # equal sizes on all ranks
        _, (_, scores, labels) = model(batch)
        ex = batch.exclude
        ranks = target_ranks(
            scores[:real], labels[:real],
            ex.lengths()[:real] if ex is not None else None, ex.values() if ex is not None else None,
        )
        totals = totals.add(ranking_totals(ranks.cpu(), cfg.k))
    t = totals.as_tensor().to(device if device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    model.train(was_training)
    return RankingTotals.from_tensor(t.cpu())


def embedding_footprint(tables: List[EmbeddingBagConfig], optimizer: str) -> Dict[str, Any]:
    """Parameters, bytes and compression ratio of the input embedding tables."""
    mems = [table_memory(t, OPTIMIZERS[optimizer]) for t in tables]
    params = sum(m.num_parameters for m in mems)
    # memcom_double's second table ("item2") counts towards its entity's table ("item").
    names = {m.table for m in mems}
    owner: Dict[str, str] = {}
    for m in mems:
        base = m.table[: -len(SECOND_TABLE_SUFFIX)]
        owner[m.table] = base if m.table.endswith(SECOND_TABLE_SUFFIX) and base in names else m.table
    group_params: Dict[str, int] = {}
    for m in mems:
        group_params[owner[m.table]] = group_params.get(owner[m.table], 0) + m.num_parameters
    entities = [m for m in mems if owner[m.table] == m.table]
    uncompressed = sum(m.num_embeddings * m.embedding_dim for m in entities)
    return {
        "embedding_params": params,
        "embedding_bytes": sum(m.param_bytes for m in mems),
        "compression_ratio": uncompressed / params,
        "table_compression_ratios": {
            m.table: m.num_embeddings * m.embedding_dim / group_params[m.table] for m in entities
        },
        "tables": {m.table: asdict(m) for m in mems},
    }


def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Runs training with early stopping, then evaluates the best model on test.

    Returns:
        Dict[str, Any]: the run's metrics (also written to ``out_dir/metrics.json`` by rank 0).
    """
    rank, world, device = init_distributed(cfg.device)
    manifest = read_manifest(cfg.data_dir)
    num_users, num_items = int(manifest["num_users"]), int(manifest["num_items"])
    model, tables = build_model(cfg, num_users, num_items, device)
    model = shard_model(cfg, model, tables, world, device)
    optimizer, dense = build_optimizer(cfg, model)
    ckpt_root, best_root = os.path.join(cfg.out_dir, "checkpoints"), os.path.join(cfg.out_dir, "best")
    optimizers = {"fused": model.fused_optimizer, "dense": dense}

    state: Dict[str, Any] = {"epoch": 0, "batch_in_epoch": 0, "step": 0, "best_ndcg": -1.0, "best_epoch": -1,
                             "bad_epochs": 0, "valid": [], "train_seconds": 0.0,
                             "epoch_loss_sum": 0.0, "epoch_batches": 0, "resumed_from_steps": []}
    latest = latest_checkpoint(ckpt_root) if os.path.isdir(ckpt_root) else None
    if latest is not None:
        dense.init_state()
        meta = load_checkpoint(latest, model, optimizers)
        state.update(meta["train_state"])
        state["resumed_from_steps"] = state.get("resumed_from_steps", []) + [state["step"]]
        if rank == 0:
            logger.info("resumed from %s (epoch %d, batch %d)", latest, state["epoch"], state["batch_in_epoch"])

    def checkpoint(root: str, keep: int) -> None:
        save_checkpoint(root, state["step"], model, optimizers,
                        meta={"train_state": dict(state), "config": asdict(cfg)}, keep=keep)

    t_start = time.time() - state["train_seconds"]
    # a restart after the last step (or after early stopping) trains no more
    stop = (bool(cfg.max_steps) and state["step"] >= cfg.max_steps) or state["bad_epochs"] >= cfg.patience
    while state["epoch"] < cfg.epochs and not stop:
        epoch = state["epoch"]
        loader = make_dataloader(
            cfg.data_dir, "train", cfg.batch_size, rank, world, shuffle=True, seed=cfg.seed, epoch=epoch,
            history_len=cfg.history_len, num_workers=cfg.num_workers,
        )
        # Every rank steps through the same number of batches of the same size
        # (TorchRec's row-wise output dist needs it): trailing batches are padded.
        transform = batch_transform(cfg)
        it = (transform(pad_batch(b, cfg.batch_size)) for b in loader)
        for _ in range(state["batch_in_epoch"]):  # resume mid-epoch: skip what was trained
            next(it)
        pipeline = make_pipeline(cfg, model, optimizer, device)
        bar = tqdm(total=len(loader), initial=state["batch_in_epoch"], desc=f"epoch {epoch}", disable=rank != 0,
                   mininterval=5.0)
        loss_sum, n = state.get("epoch_loss_sum", 0.0), state.get("epoch_batches", 0)  # carried across a resume
        while state["batch_in_epoch"] < len(loader):
            # dropout masks depend on (seed, step, rank) only, so a resumed run draws the same ones
            torch.manual_seed(cfg.seed * 1_000_003 + state["step"] * world + rank)
            loss, _, _ = pipeline.progress(it)
            state["batch_in_epoch"] += 1
            state["step"] += 1
            loss_sum, n = loss_sum + float(loss), n + 1
            bar.update(1)
            if n % 50 == 0:
                bar.set_postfix(loss=f"{loss_sum / n:.4f}", refresh=False)
            if cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0:
                state["train_seconds"] = time.time() - t_start
                state["epoch_loss_sum"], state["epoch_batches"] = loss_sum, n
                checkpoint(ckpt_root, cfg.keep_checkpoints)
            if cfg.max_steps and state["step"] >= cfg.max_steps:
                stop = True
                break
        bar.close()
        if isinstance(pipeline, TrainPipelineSparseDist):
            pipeline.detach()
        if stop:
            break
        valid = evaluate(cfg, model, "valid", rank, world, device)
        state["valid"].append({"epoch": epoch, "ndcg": valid.mean_ndcg, "hr": valid.mean_hr, "loss": loss_sum / max(n, 1)})
        if rank == 0:
            logger.info("epoch %d: train loss %.4f, valid nDCG@%d %.4f HR@%d %.4f",
                        epoch, loss_sum / max(n, 1), cfg.k, valid.mean_ndcg, cfg.k, valid.mean_hr)
        state["epoch"], state["batch_in_epoch"] = epoch + 1, 0
        state["epoch_loss_sum"], state["epoch_batches"] = 0.0, 0
        improved = valid.mean_ndcg > state["best_ndcg"]
        if improved:
            state["best_ndcg"], state["best_epoch"], state["bad_epochs"] = valid.mean_ndcg, epoch, 0
        else:
            state["bad_epochs"] += 1
        state["train_seconds"] = time.time() - t_start
        if improved:
            checkpoint(best_root, 1)
        checkpoint(ckpt_root, cfg.keep_checkpoints)
        if state["bad_epochs"] >= cfg.patience:
            if rank == 0:
                logger.info("early stopping after epoch %d (best %d)", epoch, state["best_epoch"])
            break
    train_seconds = time.time() - t_start
    best = latest_checkpoint(best_root) if os.path.isdir(best_root) else None
    if best is not None:
        load_checkpoint(best, model)
    if state["valid"]:
        valid_best = max(v["ndcg"] for v in state["valid"])
    else:  # stopped by max_steps before any validation: score the final model, the one tested below
        valid_best = evaluate(cfg, model, "valid", rank, world, device).mean_ndcg
    test = evaluate(cfg, model, "test", rank, world, device)
    result = {
        "method": cfg.method,
        "target_compression_ratio": cfg.compression_ratio if cfg.method != "uncompressed" else 1.0,
        **{k: v for k, v in embedding_footprint(tables, cfg.embedding_optimizer).items()},
        f"valid_ndcg@{cfg.k}": valid_best,
        f"test_ndcg@{cfg.k}": test.mean_ndcg,
        f"test_hr@{cfg.k}": test.mean_hr,
        "test_users": test.count,
        "best_epoch": state["best_epoch"],
        "epochs_run": len(state["valid"]),
        "steps": state["step"],
        "resumed_from_steps": state["resumed_from_steps"],
        "train_seconds": train_seconds,
        "world_size": world,
        "valid_curve": state["valid"],
        "config": asdict(cfg),
        "best_checkpoint": best,
    }
    if rank == 0:
        os.makedirs(cfg.out_dir, exist_ok=True)
        with open(os.path.join(cfg.out_dir, "metrics.json"), "w") as f:
            json.dump(result, f, indent=2)
        logger.info("test nDCG@%d %.4f HR@%d %.4f (%d users)", cfg.k, test.mean_ndcg, cfg.k, test.mean_hr, test.count)
    return result
