"""Training job: config -> data -> sharded model -> fused optimizers -> loop -> eval -> checkpoints.

Runs on 1..N processes (torchrun/torchx set the env; a plain ``python -m``
run is a world of one). Embedding tables are sharded by DistributedModelParallel
onto FBGEMM fused kernels (each method's collection by the sharder the method
registry names: ``modules.methods.method_sharders``);
the dense part is data-parallel with Adam; TorchRec's ``TrainPipelineSparseDist``
overlaps the next batch's input all-to-all with the current step.
"""

import contextlib
import itertools
import logging
import os
import signal
import time
from dataclasses import asdict
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.train_pipeline import TrainPipelineBase, TrainPipelineSparseDist
from torchrec.distributed.types import ShardingEnv, ShardingType
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from tqdm import tqdm

from memcom_torchrec.data import make_dataloader, pad_batch, read_manifest
from memcom_torchrec.eval.metrics import RankingTotals, ScoredBatch, rank_batches
from memcom_torchrec.models.builder import build_model, resolve_checkpoint
from memcom_torchrec.models.checkpoint import latest_checkpoint, load_checkpoint, read_meta, save_checkpoint
from memcom_torchrec.modules.memory import table_memory
from memcom_torchrec.modules.methods import get_method, method_sharders
from memcom_torchrec.train.assignment import clustered_init, set_frequency_assignments
from memcom_torchrec.train.config import TrainConfig
from memcom_torchrec.train.distill import check_teacher, load_teacher
from memcom_torchrec.train.distributed_env import init_distributed
from memcom_torchrec.train.qat import QuantizationAwareTraining
from memcom_torchrec.train.rank_stats import peak_rss_mb, rank_stats, reset_peak_rss
from memcom_torchrec.train.results import EpochScore, RunResult, TrainState

logger: logging.Logger = logging.getLogger(__name__)

OPTIMIZERS = {
    "sgd": EmbOptimType.EXACT_SGD,
    "adagrad": EmbOptimType.EXACT_ADAGRAD,
    "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
    "adam": EmbOptimType.ADAM,  # CUDA only in FBGEMM
}


def fused_params(cfg: TrainConfig) -> Dict[str, Any]:
    if cfg.embedding_optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown embedding_optimizer '{cfg.embedding_optimizer}'; choose one of {list(OPTIMIZERS)}")
    return {"optimizer": OPTIMIZERS[cfg.embedding_optimizer], "learning_rate": cfg.embedding_lr}


def shard_model(cfg: TrainConfig, model: nn.Module, tables: List[EmbeddingBagConfig], world: int, device: torch.device) -> DistributedModelParallel:
    """Plans and shards every embedding table onto fused kernels (never data-parallel)."""
    fp = fused_params(cfg)
    sharders = method_sharders(fp)
    types = [cfg.sharding_type] if cfg.sharding_type else [
        ShardingType.TABLE_WISE.value, ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value
    ]
    # Every table the planner will see, named as the sharders name them (a QR table's inner <t>__q, <t>__r).
    by_type = {s.module_type: s for s in sharders}
    names = {t.name for t in tables} | {
        n for m in model.modules() if type(m) in by_type for n in by_type[type(m)].shardable_parameters(m)
    }
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

    Every collection (TorchRec's, MEmCom, QR, low-rank) is pipelined. Models that read
    items through a ``candidate`` feature (RankNet, the ``tied`` scorer) build
    that KJT inside their forward, and collections that compute their inner
    collection's input (``remaps_input``: mixed-dimension) do the same, so TorchRec
    cannot start that input dist early: they run with the plain pipeline
    (forward, backward, step).
    """
    if cfg.scores_catalogue or any(getattr(m, "remaps_input", False) for m in model.modules()):
        return TrainPipelineBase(model, optimizer, device)
    return TrainPipelineSparseDist(model, optimizer, device)


@torch.no_grad()
def evaluate(cfg: TrainConfig, model: nn.Module, split: str, rank: int, world: int, device: torch.device) -> RankingTotals:
    """Sharded full-ranking evaluation: every rank ranks its users, totals are all-reduced."""
    was_training = model.training
    model.eval()
    loader = make_dataloader(
        cfg.data_dir, split, cfg.eval_batch_size, rank, world, shuffle=False, history_len=cfg.history_len,
        num_workers=cfg.num_workers, with_user=cfg.use_user_id,
    )
    # Every rank runs the same number of batches (scoring runs collectives when sharded).
    max_batches = -(-cfg.eval_users // (world * cfg.eval_batch_size)) if cfg.eval_users else len(loader)
    bar = tqdm(loader, total=min(max_batches, len(loader)), desc=f"eval {split}", disable=rank != 0, leave=False,
               mininterval=5.0)

    def scored() -> Iterator[ScoredBatch]:
        for batch in itertools.islice(bar, max_batches):
            real = len(batch)
            batch = pad_batch(batch, cfg.eval_batch_size).to(device)  # equal sizes on all ranks
            _, (_, scores, labels) = model(batch)
            ex = batch.exclude
            yield (scores[:real], labels[:real], ex.lengths()[:real] if ex is not None else None,
                   ex.values() if ex is not None else None)

    totals = rank_batches(scored(), cfg.k)
    t = totals.as_tensor().to(device if device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    model.train(was_training)
    return RankingTotals.from_tensor(t.cpu())


def embedding_footprint(tables: List[EmbeddingBagConfig], optimizer: str) -> Dict[str, Any]:
    """Parameters, bytes and compression ratio of the input embedding tables."""
    mems = [table_memory(t, OPTIMIZERS[optimizer]) for t in tables]
    params = sum(m.num_parameters for m in mems)
    return {
        "embedding_params": params,
        "embedding_bytes": sum(m.param_bytes for m in mems),
        # stored floats per table, n*d / its ratio (TableStorage's one basis: trained scalars + assignments)
        "compression_ratio": sum(m.num_embeddings * m.embedding_dim for m in mems)
        / sum(m.num_embeddings * m.embedding_dim / m.compression_ratio for m in mems),
        "table_compression_ratios": {m.table: m.compression_ratio for m in mems},
        "tables": {m.table: asdict(m) for m in mems},
    }


# Fault injection for the restart tests: "<step>:<rank>" SIGKILLs that rank as soon as the periodic
# checkpoint of that step is complete on every rank, in a job's first attempt only (torchrun's
# TORCHELASTIC_RESTART_COUNT 0), so a restarted job resumes from exactly that step.
FAULT_AT_STEP_ENV = "MEMCOM_FAULT_AT_STEP"


def fault_at_step() -> Optional[Tuple[int, int]]:
    """``(step, rank)`` of the injected fault, or None (not set, or a restarted attempt).

    Raises:
        ValueError: naming the variable, if it is not ``<step>:<rank>``.
    """
    spec = os.environ.get(FAULT_AT_STEP_ENV, "")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return None
    step, sep, rank = spec.partition(":")
    if not (sep and step.isdigit() and rank.isdigit()):
        raise ValueError(f"{FAULT_AT_STEP_ENV}={spec!r}: expected <step>:<rank>, e.g. 8:1")
    return int(step), int(rank)


def train(cfg: TrainConfig) -> RunResult:
    """Runs training with early stopping, then evaluates the best model on test.

    Returns:
        RunResult: the run's figures (also written to ``out_dir/metrics.json`` by rank 0).
    """
    fault = fault_at_step()
    rank, world, device = init_distributed(cfg.device)
    manifest = read_manifest(cfg.data_dir)
    spec = check_teacher(cfg, manifest) if cfg.teacher else None  # before any work
    num_users, num_items = int(manifest["num_users"]), int(manifest["num_items"])
    model, tables = build_model(cfg, num_users, num_items, torch.device("meta"), seed=cfg.seed)
    if spec is not None:
        model.distill = (cfg.distill_alpha, cfg.distill_temperature)
    model = shard_model(cfg, model, tables, world, device)
    teacher = None
    if spec is not None:
        teacher = load_teacher(spec, cfg, lambda c, m, t: shard_model(c, m, t, world, device))
        if rank == 0:
            logger.info("distilling from %s (alpha %g, temperature %g)", spec.path, cfg.distill_alpha,
                        cfg.distill_temperature)
    teacher_identity = None if spec is None else spec.identity
    optimizer, dense = build_optimizer(cfg, model)
    ckpt_root, best_root = os.path.join(cfg.out_dir, "checkpoints"), os.path.join(cfg.out_dir, "best")
    optimizers = {"fused": model.fused_optimizer, "dense": dense}

    state = TrainState()
    latest = latest_checkpoint(ckpt_root) if os.path.isdir(ckpt_root) else None
    before = read_meta(latest).get("teacher") if latest is not None else teacher_identity
    if before != teacher_identity:  # a teacher is identified by its path, step and tables
        name = lambda t: f"teacher {t['path']} (step {t['step']})" if t else "no teacher"  # noqa: E731
        raise ValueError(f"{latest} was trained with {name(before)}, this run has {name(teacher_identity)}: "
                         "resume with the same --teacher or use another --out-dir")
    # Stored assignments are chosen before training (a resumed run loads its own from the checkpoint).
    if latest is None and cfg.init_from:  # fine-tuning: the weights (and assignments) of another run
        start = resolve_checkpoint(cfg.init_from)
        load_checkpoint(start, model)
        if rank == 0:
            logger.info("starting from the weights of %s", start)
    elif latest is None:
        set_frequency_assignments(cfg, model, tables)
    if latest is None and not cfg.init_from and get_method(cfg.method).warmup_method:
        start = clustered_init(cfg, rank, num_users, num_items, train)
        load_checkpoint(start, model)
        if rank == 0:
            logger.info("starting from %s", start)
    if latest is not None:
        dense.init_state()
        meta = load_checkpoint(latest, model, optimizers)
        state = TrainState.from_dict(meta["train_state"])
        state.resumed_from_steps.append(state.step)
        if rank == 0:
            logger.info("resumed from %s (epoch %d, batch %d)", latest, state.epoch, state.batch_in_epoch)

    def checkpoint(root: str, keep: int) -> None:
        save_checkpoint(root, state.step, model, optimizers,
                        meta={"train_state": asdict(state), "config": asdict(cfg), "teacher": teacher_identity},
                        keep=keep)

    def on_grid(qat: Optional[QuantizationAwareTraining]):  # pyre-ignore[3]
        """The model as it will be exported with --qat (the export's grid), else as it is."""
        return qat.on_grid() if qat is not None else contextlib.nullcontext()

    qat = QuantizationAwareTraining(model, cfg.qat) if cfg.qat else None
    if qat is not None and rank == 0:
        logger.info("quantisation-aware training for %s: %d tensors on the export's grid", cfg.qat, len(qat.targets))
    t_start = time.time() - state.train_seconds
    loop_rows, loop_seconds = 0, 0.0  # this process's training steps only (no eval, no checkpoints)
    train_rss = 0.0  # peak RSS of the training loops
    # a restart after the last step (or after early stopping) trains no more
    stop = (bool(cfg.max_steps) and state.step >= cfg.max_steps) or state.bad_epochs >= cfg.patience
    while state.epoch < cfg.epochs and not stop:
        epoch = state.epoch
        loader = make_dataloader(
            cfg.data_dir, "train", cfg.batch_size, rank, world, shuffle=True, seed=cfg.seed, epoch=epoch,
            history_len=cfg.history_len, num_workers=cfg.num_workers,
            with_user=cfg.use_user_id or (teacher is not None and teacher.needs_user_id),
        )
        # Every rank steps through the same number of batches of the same size
        # (TorchRec's row-wise output dist needs it): trailing batches are padded.
        it = (pad_batch(b, cfg.batch_size) for b in loader)
        for _ in range(state.batch_in_epoch):  # resume mid-epoch: skip what was trained
            next(it)
        if teacher is not None:  # the teacher's logits of each batch, for that step only
            it = map(teacher.attach, it)
        pipeline = make_pipeline(cfg, model, optimizer, device)
        bar = tqdm(total=len(loader), initial=state.batch_in_epoch, desc=f"epoch {epoch}", disable=rank != 0,
                   mininterval=5.0)
        loss_sum, n = state.epoch_loss_sum, state.epoch_batches  # carried across a resume
        loop_start = time.perf_counter()
        reset_peak_rss()  # the training peak, apart from evaluation's
        while state.batch_in_epoch < len(loader):
            # dropout masks depend on (seed, step, rank) only, so a resumed run draws the same ones
            torch.manual_seed(cfg.seed * 1_000_003 + state.step * world + rank)
            with on_grid(qat):
                loss, _, _ = pipeline.progress(it)
            state.batch_in_epoch += 1
            state.step += 1
            loss_sum, n = loss_sum + float(loss), n + 1
            loop_rows += cfg.batch_size
            bar.update(1)
            if n % 50 == 0:
                bar.set_postfix(loss=f"{loss_sum / n:.4f}", refresh=False)
            if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                state.train_seconds = time.time() - t_start
                state.epoch_loss_sum, state.epoch_batches = loss_sum, n
                checkpoint(ckpt_root, cfg.keep_checkpoints)
                if fault == (state.step, rank):
                    logger.warning("%s: killing rank %d after the checkpoint of step %d", FAULT_AT_STEP_ENV, rank,
                                   state.step)
                    logging.shutdown()
                    os.kill(os.getpid(), signal.SIGKILL)
            if cfg.max_steps and state.step >= cfg.max_steps:
                stop = True
                break
        epoch_seconds = time.perf_counter() - loop_start
        loop_seconds += epoch_seconds
        train_rss = max(train_rss, peak_rss_mb())
        bar.close()
        if isinstance(pipeline, TrainPipelineSparseDist):
            pipeline.detach()
        if stop:
            break
        valid_start = time.perf_counter()
        with on_grid(qat):
            valid = evaluate(cfg, model, "valid", rank, world, device)
        valid_seconds = time.perf_counter() - valid_start
        state.valid.append(EpochScore(epoch=epoch, ndcg=valid.mean_ndcg, hr=valid.mean_hr, loss=loss_sum / max(n, 1)))
        if rank == 0:  # the validation's share of the epoch (whole split, every epoch)
            logger.info("epoch %d: train loss %.4f, valid nDCG@%d %.4f HR@%d %.4f (training %.0f s, validation %.1f s: "
                        "%.0f%% of the epoch)", epoch, loss_sum / max(n, 1), cfg.k, valid.mean_ndcg, cfg.k,
                        valid.mean_hr, epoch_seconds, valid_seconds,
                        100 * valid_seconds / max(epoch_seconds + valid_seconds, 1e-9))
        state.epoch, state.batch_in_epoch = epoch + 1, 0
        state.epoch_loss_sum, state.epoch_batches = 0.0, 0
        improved = valid.mean_ndcg > state.best_ndcg
        if improved:
            state.best_ndcg, state.best_epoch, state.bad_epochs = valid.mean_ndcg, epoch, 0
        else:
            state.bad_epochs += 1
        state.train_seconds = time.time() - t_start
        if improved:
            checkpoint(best_root, 1)
        checkpoint(ckpt_root, cfg.keep_checkpoints)
        if state.bad_epochs >= cfg.patience:
            if rank == 0:
                logger.info("early stopping after epoch %d (best %d)", epoch, state.best_epoch)
            break
    train_seconds = time.time() - t_start
    best = latest_checkpoint(best_root) if os.path.isdir(best_root) else None
    if best is not None:
        load_checkpoint(best, model)
        qat = QuantizationAwareTraining(model, cfg.qat) if cfg.qat else None  # the loaded tensors
    with on_grid(qat):
        if state.valid:
            valid_best = max(v.ndcg for v in state.valid)
        else:  # stopped by max_steps before any validation: score the final model, the one tested below
            valid_best = evaluate(cfg, model, "valid", rank, world, device).mean_ndcg
        test = evaluate(cfg, model, "test", rank, world, device)
    stats: List[Dict[str, float]] = [{}] * world
    dist.all_gather_object(stats, rank_stats(model, loop_rows, loop_seconds, train_rss, max(train_rss, peak_rss_mb())))
    result = RunResult(
        method=cfg.method,
        target_compression_ratio=cfg.compression_ratio if get_method(cfg.method).compresses else 1.0,
        **embedding_footprint(tables, cfg.embedding_optimizer),
        k=cfg.k,
        valid_ndcg=valid_best,
        test_ndcg=test.mean_ndcg,
        test_hr=test.mean_hr,
        test_users=test.count,
        test_ndcg_se=test.ndcg_se,
        best_epoch=state.best_epoch,
        epochs_run=len(state.valid),
        steps=state.step,
        resumed_from_steps=state.resumed_from_steps,
        train_seconds=train_seconds,
        world_size=world,
        valid_curve=state.valid,
        config=asdict(cfg),
        best_checkpoint=best,
        rank_stats=stats,
    )
    if rank == 0:
        result.save(cfg.out_dir)
        logger.info("test nDCG@%d %.4f HR@%d %.4f (%d users)", cfg.k, test.mean_ndcg, cfg.k, test.mean_hr, test.count)
        for r, st in enumerate(stats):
            logger.info(
                "rank %d: %.0f interactions/s over %.1f s of training, peak RSS %.0f MiB training / %.0f MiB "
                "with evaluation, embedding parameters %.1f MiB + optimizer state %.1f MiB",
                r, st["train_rows_per_second"], st["train_seconds"], st["train_peak_rss_mb"], st["peak_rss_mb"],
                st["embedding_param_bytes"] / 2**20, st["embedding_optimizer_bytes"] / 2**20,
            )
    return result
