"""ShardedQREmbeddingBagCollection against its unsharded twin on 2-process gloo runs.

qr (Q and R only) and memcom_qr (w[i] * Q[i // p] * R[i % p]): forward outputs,
every table and w after every step, w's gradients (one SGD step), table-wise and
row-wise, Adagrad and row-wise Adagrad; input weights; bad input; the planner;
TrainPipelineSparseDist (pipelined, and equal to the plain pipeline); DCP
checkpoints re-sharded from row-wise to table-wise.
"""

import os
from typing import Dict, List, Optional

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor, PoolingType
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embedding import ShardedEmbeddingCollection
from torchrec.distributed.train_pipeline import TrainPipelineBase, TrainPipelineSparseDist
from torchrec.distributed.types import ShardingEnv, ShardingType
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.streamable import Pipelineable

from memcom_torchrec import QREmbeddingBagCollectionSharder, ShardedQREmbeddingBagCollection
from memcom_torchrec.distributed.state_dict_utils import gather_unsharded_state_dict, load_unsharded_state_dict
from memcom_torchrec.modules import QREmbeddingBagCollection, QREmbeddingBagConfig
from memcom_torchrec.optim import fused_step
from memcom_torchrec.optim.fused_step import ATEN, COMPILED
from dist_utils import require_kernel, run_multiprocess, run_pipeline, shard_with_planner
from reference import ReferenceOptimizer, make_kjt_inputs, planted_labels, reference_step

pytestmark = pytest.mark.slow

KEYS = ["hist", "target", "user", "cat"]
SIZES = {"hist": 101, "target": 101, "user": 12, "cat": 30}
OUT_DIM = 8 + 8 + 8 + 4
OPT = {
    "sgd": EmbOptimType.EXACT_SGD,
    "adagrad": EmbOptimType.EXACT_ADAGRAD,
    "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
}
INNER_TABLES = ["item__q", "item__r", "user", "cat__q", "cat__r"]
W_KEYS = ["_entity_weights.item", "_entity_weights.cat"]


def make_tables(method: str) -> List[EmbeddingBagConfig]:
    """item: 101 entities, p = 10 (11 rows of Q, the last one partial); cat: mean-pooled, dim 4 (a second child)."""
    w = method == "memcom_qr"
    return [
        QREmbeddingBagConfig(
            name="item", num_embeddings=101, embedding_dim=8, feature_names=["hist", "target"], num_collisions=10,
            entity_weights=w,
        ),
        EmbeddingBagConfig(name="user", num_embeddings=12, embedding_dim=8, feature_names=["user"]),
        QREmbeddingBagConfig(
            name="cat", num_embeddings=30, embedding_dim=4, feature_names=["cat"], num_collisions=4,
            pooling=PoolingType.MEAN, entity_weights=w,
        ),
    ]


def make_reference(method: str, weighted: bool = False, seed: int = 0) -> QREmbeddingBagCollection:
    """The unsharded twin with R and w randomised (they start at 1.0), so that a mix-up shows."""
    torch.manual_seed(seed)
    ref = QREmbeddingBagCollection(make_tables(method), is_weighted=weighted)
    with torch.no_grad():
        for name in ("item", "cat"):
            ref.qr_parameters(name)[1].uniform_(0.5, 1.5)
        for w in ref._entity_weights.values():
            w.uniform_(0.5, 1.5)
    return ref


def shard(method: str, world_size: int, sharding_type: str, optimizer: str, lr: float = 0.1,
          weighted: bool = False) -> DistributedModelParallel:
    model = QREmbeddingBagCollection(make_tables(method), is_weighted=weighted, device=torch.device("meta"))
    sharder = QREmbeddingBagCollectionSharder(fused_params={"optimizer": OPT[optimizer], "learning_rate": lr})
    return shard_with_planner(model, [sharder], {t: sharding_type for t in INNER_TABLES})


def batches(step: int, world_size: int, weighted: bool = False, batch: int = 4):
    out = []
    for r in range(world_size):
        g = torch.Generator().manual_seed(1000 * step + r)
        values, lengths = make_kjt_inputs(KEYS, SIZES, batch, 5, g)
        weights = torch.rand(values.numel(), generator=g) + 0.5 if weighted else None
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=KEYS, values=values, lengths=lengths, weights=weights)
        out.append((kjt, torch.randn(batch, OUT_DIM, generator=g)))
    return out


def _compare_body(rank: int, world_size: int, method: str, sharding_type: str, optimizer: str, steps: int,
                  weighted: bool = False, kernel: Optional[str] = None) -> None:
    lr = 0.1
    fused_step.set_kernel(kernel)  # w's step: the compiled op or the ATen fallback (None: the default)
    ref = make_reference(method, weighted)
    start = {k: v.clone() for k, v in ref.state_dict().items()}
    dmp = shard(method, world_size, sharding_type, optimizer, lr, weighted)
    sharded = dmp.module
    assert isinstance(sharded, ShardedQREmbeddingBagCollection)
    # The stock sharder took both inner collections, under their own names.
    assert isinstance(sharded._embedding_collection, ShardedEmbeddingCollection)
    assert isinstance(sharded._embedding_collection_d4, ShardedEmbeddingCollection)
    sd = dmp.state_dict()
    assert set(sd) == set(ref.state_dict()), (sorted(sd), sorted(ref.state_dict()))
    if method == "memcom_qr":  # w: a 1-D ShardedTensor named like the unsharded parameter
        assert all(isinstance(sd[k], ShardedTensor) and tuple(sd[k].size()) == (n,) for k, n in zip(W_KEYS, (101, 30)))
    # The fused optimizers of all ranks together update exactly the parameters: every table and w.
    keys = [None] * world_size
    dist.all_gather_object(keys, sorted(dmp.fused_optimizer.params))
    assert set().union(*keys) == set(ref.state_dict()), keys
    load_unsharded_state_dict(dmp, ref.state_dict())

    ref_opt = ReferenceOptimizer(optimizer, lr)
    for step in range(steps):
        data = batches(step, world_size, weighted)
        kjt, proj = data[rank]
        out = dmp(kjt).wait()
        expected, grads = reference_step(ref, ref_opt, data, world_size)
        assert out.keys() == KEYS
        torch.testing.assert_close(out.values(), expected[rank], atol=1e-5, rtol=1e-5)
        before = gather_unsharded_state_dict(dmp, dst=None)
        (out.values() * proj).sum().backward()
        dmp.fused_optimizer.step()
        got = gather_unsharded_state_dict(dmp, dst=None)
        for name, value in ref.state_dict().items():
            torch.testing.assert_close(got[name], value, atol=1e-5, rtol=1e-5, msg=lambda m: f"step {step} {name}: {m}")
        if optimizer == "sgd":  # (before - after) / lr is the gradient the fused update applied
            for name, grad in grads.items():
                torch.testing.assert_close((before[name] - got[name]) / lr, grad, atol=1e-4, rtol=1e-4,
                                           msg=lambda m: f"gradient of {name}: {m}")
    # Not vacuous: R and (memcom_qr) w moved.
    got = gather_unsharded_state_dict(dmp, dst=None)
    moved = ["_embedding_collection.embeddings.item__r.weight"] + (W_KEYS if method == "memcom_qr" else [])
    for name in moved:
        assert not torch.allclose(got[name], start[name]), f"{name} did not move"

    # A bad id on one rank raises on every rank (no hang in the all-to-all), and so does an empty batch.
    bad = KeyedJaggedTensor.from_lengths_sync(
        keys=KEYS, values=torch.tensor([0, 101 if rank == world_size - 1 else 0, 0, 0]), lengths=torch.ones(4, dtype=torch.long),
        weights=torch.ones(4) if weighted else None,
    )
    with pytest.raises(ValueError, match=r"id 101 is out of range for table 'item' \(num_embeddings=101\)"):
        dmp(bad).wait()
    empty = KeyedJaggedTensor.from_lengths_sync(
        keys=KEYS, values=torch.zeros(0, dtype=torch.long), lengths=torch.zeros(0, dtype=torch.long),
        weights=torch.zeros(0) if weighted else None,
    )
    with pytest.raises(ValueError, match="empty batch on a sharded QR collection: pad it"):
        dmp(empty if rank == 0 else batches(0, world_size, weighted)[rank][0]).wait()


@pytest.mark.parametrize("method,kernel", [("qr", None), ("memcom_qr", COMPILED), ("memcom_qr", ATEN)],
                         ids=["qr", "memcom_qr-compiled", "memcom_qr-aten"])
@pytest.mark.parametrize("sharding_type", [ShardingType.TABLE_WISE.value, ShardingType.ROW_WISE.value])
@pytest.mark.parametrize("optimizer", ["adagrad", "rowwise_adagrad"])
def test_sharded_matches_unsharded_several_steps(method: str, sharding_type: str, optimizer: str,
                                                 kernel: Optional[str]) -> None:
    require_kernel(kernel)
    run_multiprocess(_compare_body, world_size=2, method=method, sharding_type=sharding_type, optimizer=optimizer, steps=3,
                     kernel=kernel)


@pytest.mark.parametrize("kernel", [COMPILED, ATEN])
@pytest.mark.parametrize("sharding_type", [ShardingType.TABLE_WISE.value, ShardingType.ROW_WISE.value])
def test_sharded_gradients_match_unsharded_sgd(sharding_type: str, kernel: str) -> None:
    # Two SGD steps: each (before - after) / lr is the gradient of Q, R and w.
    require_kernel(kernel)
    run_multiprocess(_compare_body, world_size=2, method="memcom_qr", sharding_type=sharding_type, optimizer="sgd", steps=2,
                     kernel=kernel)


def test_world_of_one_matches_unsharded() -> None:
    run_multiprocess(_compare_body, world_size=1, method="memcom_qr", sharding_type=ShardingType.ROW_WISE.value,
                     optimizer="rowwise_adagrad", steps=2)


def test_sharded_weighted_input_matches_unsharded() -> None:
    # The input's own weights stay on the rank that owns the batch; i % p travels as the KJT weight.
    run_multiprocess(_compare_body, world_size=2, method="memcom_qr", sharding_type=ShardingType.ROW_WISE.value,
                     optimizer="rowwise_adagrad", steps=2, weighted=True)


# ------------------------------------------------------------------ planner
def _planner_body(rank: int, world_size: int) -> None:
    from torchrec.distributed.sharding_plan import get_default_sharders

    ref = make_reference("memcom_qr")
    model = QREmbeddingBagCollection(make_tables("memcom_qr"), device=torch.device("meta"))
    sharder = QREmbeddingBagCollectionSharder()
    # The planner sizes w as p extra columns of Q.
    params = sharder.shardable_parameters(model)
    assert sorted(params) == sorted(INNER_TABLES)
    assert tuple(params["item__q"].shape) == (11, 8 + 10) and tuple(params["item__r"].shape) == (10, 8)
    dmp = DistributedModelParallel(
        model, env=ShardingEnv.from_process_group(dist.group.WORLD), device=torch.device("cpu"),
        sharders=[sharder, *get_default_sharders()],
    )
    assert isinstance(dmp.module, ShardedQREmbeddingBagCollection)
    load_unsharded_state_dict(dmp, ref.state_dict())
    kjt, _ = batches(0, world_size)[rank]
    torch.testing.assert_close(dmp(kjt).wait().values(), ref(kjt).values().detach(), atol=1e-5, rtol=1e-5)


def test_default_sharders_and_planner_shard_the_collection() -> None:
    run_multiprocess(_planner_body, world_size=2)


# ---------------------------------------------------------- train pipeline
class Model(nn.Module):
    """A QR collection and a dense head."""

    def __init__(self, method: str) -> None:
        super().__init__()
        self.qr = QREmbeddingBagCollection(make_tables(method), device=torch.device("meta"))
        self.head = nn.Linear(OUT_DIM, 1)

    def forward(self, batch: "LabelledBatch"):
        pred = self.head(self.qr(batch.features).values()).squeeze(1)
        loss = ((pred - batch.labels) ** 2).mean()
        return loss, (loss.detach(), pred.detach(), batch.labels)


class LabelledBatch(Pipelineable):
    def __init__(self, features: KeyedJaggedTensor, labels: torch.Tensor) -> None:
        self.features, self.labels = features, labels

    def to(self, device: torch.device, non_blocking: bool = False) -> "LabelledBatch":
        return LabelledBatch(self.features.to(device), self.labels.to(device))

    def record_stream(self, stream: torch.Stream) -> None:
        pass

    def pin_memory(self) -> "LabelledBatch":
        return self


def _labelled_batches(rank: int, steps: int):
    table = torch.randn(200, generator=torch.Generator().manual_seed(7))
    for step in range(steps):
        kjt, _ = batches(step % 5, 2)[rank]
        yield LabelledBatch(kjt, planted_labels(kjt, table))


def _train(method: str, world_size: int, rank: int, pipeline_class: type, steps: int):
    torch.manual_seed(0)
    model = Model(method)
    sharder = QREmbeddingBagCollectionSharder(fused_params={"optimizer": OPT["rowwise_adagrad"], "learning_rate": 0.1})
    dmp = shard_with_planner(model, [sharder], {t: ShardingType.ROW_WISE.value for t in INNER_TABLES})
    load_unsharded_state_dict(dmp, {f"qr.{k}": v for k, v in make_reference(method).state_dict().items()}
                              | {f"head.{k}": v for k, v in nn.Linear(OUT_DIM, 1).state_dict().items()})
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                  lambda p: torch.optim.Adam(p, lr=0.01))
    pipeline = pipeline_class(dmp, CombinedOptimizer([dmp.fused_optimizer, dense]), torch.device("cpu"))
    losses = run_pipeline(pipeline, _labelled_batches(rank, steps))
    return pipeline, losses, gather_unsharded_state_dict(dmp, dst=None)


def _pipeline_body(rank: int, world_size: int, method: str) -> None:
    pipeline, losses, params = _train(method, world_size, rank, TrainPipelineSparseDist, 40)
    assert isinstance(pipeline._pipelined_modules[0], ShardedQREmbeddingBagCollection), pipeline._pipelined_modules
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5]), losses
    # Pipelining changes when the input all-to-all runs, not the math: the plain pipeline ends equal.
    _, base_losses, base_params = _train(method, world_size, rank, TrainPipelineBase, 40)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(base_losses), atol=1e-5, rtol=1e-5)
    for name, value in base_params.items():
        torch.testing.assert_close(params[name], value, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    if method == "memcom_qr":
        start = make_reference(method).state_dict()
        for key in W_KEYS:
            assert not torch.allclose(params[f"qr.{key}"], start[key]), f"{key} never moved: it is not trained"


@pytest.mark.parametrize("method", ["qr", "memcom_qr"])
def test_train_pipeline_sparse_dist_pipelines_the_collection(method: str) -> None:
    run_multiprocess(_pipeline_body, world_size=2, method=method)


# -------------------------------------------------------------- checkpoints
def _checkpoint_state(dmp: DistributedModelParallel) -> Dict[str, object]:
    return {"model": dmp.state_dict(), "optim": dmp.fused_optimizer.state_dict()}


def _save_body(rank: int, world_size: int, root: str, kernel: Optional[str] = None) -> None:
    fused_step.set_kernel(kernel)  # w's step (None: the default)
    dmp = shard("memcom_qr", world_size, ShardingType.ROW_WISE.value, "adagrad")
    load_unsharded_state_dict(dmp, make_reference("memcom_qr").state_dict())
    for step in range(2):
        kjt, proj = batches(step, world_size)[rank]
        (dmp(kjt).wait().values() * proj).sum().backward()
    dcp.save(_checkpoint_state(dmp), checkpoint_id=os.path.join(root, "ckpt"))
    saved = gather_unsharded_state_dict(dmp, dst=None)
    kjt, proj = batches(2, world_size)[rank]
    (dmp(kjt).wait().values() * proj).sum().backward()
    after = gather_unsharded_state_dict(dmp, dst=None)
    if rank == 0:
        torch.save({"saved": saved, "after": after}, os.path.join(root, "expected.pt"))


def _load_body(rank: int, world_size: int, root: str, kernel: Optional[str] = None) -> None:
    fused_step.set_kernel(kernel)
    dmp = shard("memcom_qr", world_size, ShardingType.TABLE_WISE.value, "adagrad")
    state = _checkpoint_state(dmp)
    dcp.load(state, checkpoint_id=os.path.join(root, "ckpt"))
    dmp.fused_optimizer.load_state_dict(state["optim"])
    expected = torch.load(os.path.join(root, "expected.pt"))
    got = gather_unsharded_state_dict(dmp, dst=None)
    for name, value in expected["saved"].items():
        torch.testing.assert_close(got[name], value, atol=0, rtol=0, msg=lambda m: f"{name}: {m}")
    kjt, proj = batches(2, world_size)[rank]
    (dmp(kjt).wait().values() * proj).sum().backward()
    got = gather_unsharded_state_dict(dmp, dst=None)
    for name, value in expected["after"].items():  # the Adagrad state of Q, R and w came back too
        torch.testing.assert_close(got[name], value, atol=1e-6, rtol=1e-6, msg=lambda m: f"after a step, {name}: {m}")


@pytest.mark.parametrize("save_kernel,load_kernel", [(COMPILED, ATEN), (ATEN, COMPILED)])
def test_checkpoint_reshards_row_wise_to_table_wise(tmp_path, save_kernel: str, load_kernel: str) -> None:
    # w's state saved by one implementation of its step is resumed by the other.
    for kernel in (save_kernel, load_kernel):
        require_kernel(kernel)
    root = str(tmp_path)
    run_multiprocess(_save_body, world_size=2, root=root, kernel=save_kernel)
    run_multiprocess(_load_body, world_size=2, root=root, kernel=load_kernel)
