"""Sharded MEmCom: bad input on one rank, TrainPipelineSparseDist with mixed tables, DCP checkpoints."""

import dataclasses
import os
import json
from typing import Optional, Tuple

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.types import ShardingType
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.streamable import Pipelineable
from torchrec.optim.optimizers import in_backward_optimizer_filter

from memcom_torchrec import MEmComEmbeddingBagCollection, MEmComEmbeddingBagCollectionSharder, MEmComEmbeddingBagConfig
from memcom_torchrec.distributed.memcom_embeddingbag import GATHERED, WEIGHTED_TBE
from memcom_torchrec.distributed.state_dict_utils import gather_unsharded_state_dict, load_unsharded_state_dict
from memcom_torchrec.models.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from memcom_torchrec.optim import fused_step
from memcom_torchrec.optim.fused_step import ATEN, COMPILED
from dist_utils import require_kernel, run_multiprocess, run_pipeline, shard_with_planner
from reference import HostReads, ReferenceOptimizer, in_key_order, planted_labels, reference_step
from test_sharded_memcom import KEYS, OPT, batches, make_reference, make_tables, shard

pytestmark = pytest.mark.slow


# ----------------------------------------------------------------- bad input
def _bad_input_body(rank: int, world_size: int) -> None:
    ref = make_reference()
    dmp = shard(world_size, ShardingType.ROW_WISE.value, "sgd", 0.1)
    load_unsharded_state_dict(dmp, ref.state_dict())
    kjt, _ = batches(0, world_size)[rank]
    if rank == 0:
        values = kjt.values().clone()
        values[0] = 101  # table 'item' has 101 entities
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=kjt.keys(), values=values, lengths=kjt.lengths())
        expected = r"feature 'hist': id 101 is out of range for table 'item' \(num_embeddings=101\)"
    else:
        expected = r"bad input on rank 0: feature 'hist': id 101 is out of range"
    with pytest.raises(ValueError, match=expected):
        dmp(kjt).wait()
    # Both ranks are still in step: a good batch afterwards gives the unsharded twin's values.
    good, _ = batches(1, world_size)[rank]
    # The in-step check of a good batch reads one flag back to the host, nothing else.
    with HostReads() as mode:
        dmp.module._check_input(good)
    assert mode.reads == [], mode.reads
    torch.testing.assert_close(in_key_order(dmp(good).wait(), KEYS), ref(good).values(), atol=1e-6, rtol=1e-6)


def test_bad_input_raises_on_every_rank_without_hanging() -> None:
    run_multiprocess(_bad_input_body, world_size=2)


def _mixed_dim_bad_input_body(rank: int, world_size: int) -> None:
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    from memcom_torchrec.modules.mixed_dim_configs import MixedDimEmbeddingBagConfig
    from memcom_torchrec.modules.mixed_dim_embedding_modules import MixedDimEmbeddingBagCollection
    from dist_utils import shard_with_planner

    tables = [MixedDimEmbeddingBagConfig(name="item", num_embeddings=40, embedding_dim=8, feature_names=["hist"],
                                         head_rows=6, tail_dim=4)]
    module = MixedDimEmbeddingBagCollection(tables, device=torch.device("meta"))
    sharder = MEmComEmbeddingBagCollectionSharder(fused_params={"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.1})
    dmp = shard_with_planner(module, [sharder], {"item__head": ShardingType.ROW_WISE.value,
                                                 "item__tail": ShardingType.ROW_WISE.value})
    values = torch.tensor([3, 40 if rank == 0 else 5, 7])
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["hist"], values=values, lengths=torch.tensor([2, 1]))
    expected = (r"feature 'hist': id 40 is out of range for table 'item' \(num_embeddings=40\)" if rank == 0
                else r"bad input on rank 0: feature 'hist': id 40 is out of range")
    with pytest.raises(ValueError, match=expected):
        dmp(kjt)
    good = KeyedJaggedTensor.from_lengths_sync(keys=["hist"], values=torch.tensor([3, 39, 7]),
                                               lengths=torch.tensor([2, 1]))
    assert dmp(good).values().shape == (2, 8)  # both ranks still in step


def test_mixed_dim_bad_input_raises_on_every_rank_without_hanging() -> None:
    """A bad id on one rank of a sharded mixed-dimension collection: every rank raises, none waits."""
    run_multiprocess(_mixed_dim_bad_input_body, world_size=2)


# ---------------------------------------------------------- train pipeline
class MixedModel(nn.Module):
    """A MEmCom collection next to a stock EBC, and a dense head."""

    def __init__(self) -> None:
        super().__init__()
        self.memcom = MEmComEmbeddingBagCollection(make_tables(), device=torch.device("meta"))
        self.stock = EmbeddingBagCollection(
            tables=[EmbeddingBagConfig(name="stock", num_embeddings=50, embedding_dim=8, feature_names=["stock_f"])],
            device=torch.device("meta"),
        )
        self.head = nn.Linear(8 + 8 + 8 + 4 + 8, 1)

    def forward(self, batch):
        a = self.memcom(batch.memcom_features)
        b = self.stock(batch.stock_features)
        pred = self.head(torch.cat([a.values(), b.values()], dim=1)).squeeze(1)
        loss = ((pred - batch.labels) ** 2).mean()
        return loss, (loss.detach(), pred.detach(), batch.labels)


class PairBatch(Pipelineable):
    """Two KJTs and labels, for TrainPipelineSparseDist."""

    def __init__(self, memcom_features, stock_features, labels):
        self.memcom_features, self.stock_features, self.labels = memcom_features, stock_features, labels

    def to(self, device, non_blocking=False):
        return PairBatch(self.memcom_features.to(device), self.stock_features.to(device), self.labels.to(device))

    def record_stream(self, stream):
        pass

    def pin_memory(self):
        return self


def _planted_batches(rank: int, steps: int):
    """Labels = a fixed function of the ids, so the model can fit them."""
    table = torch.randn(200, generator=torch.Generator().manual_seed(7))
    for step in range(steps):
        kjt, _ = batches(step % 5, 2)[rank]
        g = torch.Generator().manual_seed(100 + step % 5 + 10 * rank)
        stock_ids = torch.randint(0, 50, (4,), generator=g)
        stock = KeyedJaggedTensor.from_lengths_sync(keys=["stock_f"], values=stock_ids, lengths=torch.ones(4, dtype=torch.long))
        labels = planted_labels(kjt, table) + table[stock_ids + 100]
        yield PairBatch(kjt, stock, labels)


def _pipeline_body(rank: int, world_size: int) -> None:
    torch.manual_seed(0)
    model = MixedModel()
    fp = {"optimizer": OPT["rowwise_adagrad"], "learning_rate": 0.1}
    sharders = [MEmComEmbeddingBagCollectionSharder(fused_params=fp), EmbeddingBagCollectionSharder(fused_params=fp)]
    dmp = shard_with_planner(model, sharders, {t: ShardingType.TABLE_WISE.value for t in ["item", "user", "cat", "stock"]})
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                  lambda p: torch.optim.Adam(p, lr=0.01))
    opt = CombinedOptimizer([dmp.fused_optimizer, dense])
    has_w = any("_entity_weights.item" in k for k in dmp.fused_optimizer.state_dict()["state"])
    owners = [None] * world_size
    dist.all_gather_object(owners, has_w)
    assert sum(owners) == 1, f"w of the table-wise table must sit in exactly one rank's fused optimizer: {owners}"
    pipeline = TrainPipelineSparseDist(dmp, opt, torch.device("cpu"))
    losses = run_pipeline(pipeline, _planted_batches(rank, 150))
    assert pipeline._pipelined_modules, "no module was pipelined"
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.3 * first, (first, last)
    w = gather_unsharded_state_dict(dmp, dst=None)["memcom._entity_weights.item"]
    assert float((w - 1.0).abs().max()) > 1e-3, "w never moved from its init: it is not trained"


def test_train_pipeline_sparse_dist_with_mixed_tables() -> None:
    run_multiprocess(_pipeline_body, world_size=2)


# ------------------------------------------------------------- checkpoints
def _steps(dmp, rank, world_size, first, count):
    outs = []
    for step in range(first, first + count):
        if world_size == 2:
            kjt, proj = batches(step, 2)[rank]
        else:  # one rank plays the global batch of two (TorchRec averages gradients over ranks)
            parts = batches(step, 2)
            kjt = _cat_kjt([p[0] for p in parts])
            proj = torch.cat([p[1] for p in parts]) / 2
        out = in_key_order(dmp(kjt).wait(), KEYS)
        (out * proj).sum().backward()
        outs.append(out.detach())
    return outs


def _cat_kjt(kjts):
    """Concatenate KJTs along the batch (same keys)."""
    keys = kjts[0].keys()
    values, lengths = [], []
    per = [k.to_dict() for k in kjts]
    for key in keys:
        for d in per:
            values.append(d[key].values())
            lengths.append(d[key].lengths())
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths))


def _save_body(
    rank: int, world_size: int, root: str, optimizer: str, lookup_path: str = "auto", kernel: Optional[str] = None
) -> None:
    fused_step.set_kernel(kernel)  # the gathered path's w step (None: the default)
    ref = make_reference()
    dmp = shard(world_size, ShardingType.ROW_WISE.value, optimizer, 0.1, lookup_path=lookup_path)
    load_unsharded_state_dict(dmp, ref.state_dict())
    _steps(dmp, rank, world_size, 0, 2)
    save_checkpoint(root, 2, dmp, {"fused": dmp.fused_optimizer})
    full = gather_unsharded_state_dict(dmp, dst=None)
    outs = [None] * world_size
    dist.all_gather_object(outs, _steps(dmp, rank, world_size, 2, 1)[0])
    after = gather_unsharded_state_dict(dmp, dst=None)
    if rank == 0:  # the global batch's output of step 2, whatever the world size that saved
        torch.save({"params": full, "after": after, "out": torch.cat(outs)}, os.path.join(root, "expected.pt"))


def _load_body(
    rank: int, world_size: int, root: str, sharding_type: str, optimizer: str, lookup_path: str = "auto",
    kernel: Optional[str] = None,
) -> None:
    fused_step.set_kernel(kernel)
    dmp = shard(world_size, sharding_type, optimizer, 0.1, lookup_path=lookup_path)
    load_checkpoint(root, dmp, {"fused": dmp.fused_optimizer})
    exp = torch.load(os.path.join(root, "expected.pt"))
    got = gather_unsharded_state_dict(dmp, dst=None)
    for name, value in exp["params"].items():
        torch.testing.assert_close(got[name], value, atol=1e-6, rtol=1e-6, msg=lambda m: f"{name}: {m}")
    outs = _steps(dmp, rank, world_size, 2, 1)
    per_rank = exp["out"].shape[0] // world_size
    torch.testing.assert_close(outs[0], exp["out"][rank * per_rank:(rank + 1) * per_rank], atol=1e-5, rtol=1e-5)
    after = gather_unsharded_state_dict(dmp, dst=None)
    for name, value in exp["after"].items():  # the optimizer state came back too: the next step matches
        torch.testing.assert_close(after[name], value, atol=1e-5, rtol=1e-5, msg=lambda m: f"after step, {name}: {m}")


# Saved by one lookup path (or one implementation of the gathered path's w step), resumed by another.
ROUND_TRIPS = [
    ((GATHERED, COMPILED), (WEIGHTED_TBE, None)),
    ((WEIGHTED_TBE, None), (GATHERED, ATEN)),
    ((GATHERED, ATEN), (GATHERED, COMPILED)),
]


@pytest.mark.parametrize("save,load", ROUND_TRIPS, ids=["compiled-to-tbe", "tbe-to-aten", "aten-to-compiled"])
def test_checkpoint_round_trips(tmp_path, save: Tuple[str, Optional[str]], load: Tuple[str, Optional[str]]) -> None:
    # Same state, same next step, whichever path saved and whichever resumes.
    for kernel in (save[1], load[1]):
        require_kernel(kernel)
    root = str(tmp_path / "ckpt")
    run_multiprocess(_save_body, world_size=2, root=root, optimizer="adagrad", lookup_path=save[0], kernel=save[1])
    # 2 ranks -> 2 ranks, re-sharded from row-wise to table-wise
    run_multiprocess(
        _load_body, world_size=2, root=root, sharding_type=ShardingType.TABLE_WISE.value, optimizer="adagrad",
        lookup_path=load[0], kernel=load[1],
    )
    # 2 ranks -> 1 rank
    run_multiprocess(
        _load_body, world_size=1, root=root, sharding_type=ShardingType.ROW_WISE.value, optimizer="adagrad",
        lookup_path=load[0], kernel=load[1],
    )
    # 2 ranks -> the unsharded module, in this process
    unsharded = MEmComEmbeddingBagCollection(make_tables())
    load_checkpoint(root, unsharded)
    expected = torch.load(os.path.join(root, "expected.pt"))["params"]
    for name, value in unsharded.state_dict().items():
        torch.testing.assert_close(value, expected[name], atol=1e-6, rtol=1e-6)


def test_checkpoint_one_rank_to_two_with_rowwise_adagrad_state(tmp_path) -> None:
    # Row-wise Adagrad keeps one accumulator per row of U (and one per entity of w): a 1-rank
    # checkpoint re-sharded onto 2 ranks must bring every slice of it back.
    root = str(tmp_path / "ckpt")
    run_multiprocess(_save_body, world_size=1, root=root, optimizer="rowwise_adagrad")
    for sharding_type in (ShardingType.ROW_WISE.value, ShardingType.TABLE_WISE.value):
        run_multiprocess(_load_body, world_size=2, root=root, sharding_type=sharding_type, optimizer="rowwise_adagrad")


def test_checkpoint_mismatch_and_partial_save(tmp_path) -> None:
    root = str(tmp_path / "ckpt")
    model = make_reference(seed=0)
    save_checkpoint(root, 1, model)
    # A crash mid-save leaves a .tmp directory; LATEST still points to the complete one.
    os.makedirs(os.path.join(root, "step_00000002.tmp"))
    fresh = make_reference(seed=1)
    saved = model.state_dict()
    assert all(not torch.equal(v, saved[k]) for k, v in fresh.state_dict().items())
    load_checkpoint(root, fresh)
    for name, value in fresh.state_dict().items():  # every tensor, w included, came back
        torch.testing.assert_close(value, saved[name], atol=0, rtol=0, msg=lambda m: f"{name}: {m}")
    other = make_tables()
    other[0].num_buckets = 11
    other[0].__post_init__()
    with pytest.raises(ValueError, match=r"table 'item' differs .*'tensors': \(\{'U': \[\d+, 8\], .*'U': \[11, 8\]"):
        load_checkpoint(root, MEmComEmbeddingBagCollection(other))
    # A checkpoint from before the signature recorded shapes: its kind, and its size fields against the
    # model's shapes (num_buckets = U's rows, train_entity_weights = w is there).
    meta_path = os.path.join(latest_checkpoint(root), "meta.json")
    with open(meta_path) as f:
        meta = json.load(f)
    legacy = {k: v for k, v in meta["tables"]["item"].items() if k != "tensors"}
    m = meta["tables"]["item"]["tensors"]["U"][0]
    meta["tables"]["item"] = dict(legacy, num_buckets=m, train_entity_weights=True, kind="QREmbeddingBagConfig")
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    with pytest.raises(ValueError, match=r"table 'item' differs .*'kind': \('QREmbeddingBagConfig'"):
        load_checkpoint(root, fresh)
    meta["tables"]["item"] = dict(legacy, num_buckets=m + 1, train_entity_weights=True)  # sized by the older rule
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    with pytest.raises(ValueError, match=r"'num_buckets': \(\d+, \d+\).*load them with the version that trained them"):
        load_checkpoint(root, fresh)
    meta["tables"]["item"] = dict(legacy, num_buckets=m, train_entity_weights=False)  # w missing
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    with pytest.raises(ValueError, match=r"'train_entity_weights': \(False, True\)"):
        load_checkpoint(root, fresh)
    meta["tables"]["item"] = dict(legacy, num_buckets=m, train_entity_weights=True)
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    load_checkpoint(root, fresh)
    with pytest.raises(ValueError, match="no complete checkpoint"):
        load_checkpoint(str(tmp_path / "nothing"), model)


# ------------------------------------------------------ uneven batch sizes
def _uneven_body(rank: int, world_size: int, sharding_type: str) -> None:
    ref = make_reference()
    dmp = shard(world_size, sharding_type, "sgd", 0.1)
    load_unsharded_state_dict(dmp, ref.state_dict())
    # The fused optimizers of all ranks together update exactly the trainable tensors: every U and w.
    keys = [None] * world_size
    dist.all_gather_object(keys, sorted(dmp.fused_optimizer.params))
    assert set().union(*keys) == set(ref.state_dict()), keys
    kjt, _ = batches(0, world_size, batch=3 + rank)[rank]
    if sharding_type == ShardingType.ROW_WISE.value:
        with pytest.raises(ValueError, match=r"batch sizes differ across ranks \(3 to 4"):
            dmp(kjt).wait()
        return
    # table-wise exchanges whole pooled rows: uneven batches are fine
    torch.testing.assert_close(in_key_order(dmp(kjt).wait(), KEYS), ref(kjt).values(), atol=1e-6, rtol=1e-6)
    # an empty batch on one rank
    empty = KeyedJaggedTensor.from_lengths_sync(
        keys=KEYS, values=torch.zeros(0, dtype=torch.long), lengths=torch.zeros(0, dtype=torch.long), stride=0
    )
    mine = empty if rank == 0 else batches(1, world_size)[rank][0]
    out = in_key_order(dmp(mine).wait(), KEYS)
    expected = ref(mine).values()
    assert out.shape == expected.shape == (0 if rank == 0 else 4, 8 + 8 + 8 + 4), out.shape
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("sharding_type", [ShardingType.TABLE_WISE.value, ShardingType.ROW_WISE.value])
def test_uneven_batches_and_optimizer_keys(sharding_type: str) -> None:
    run_multiprocess(_uneven_body, world_size=2, sharding_type=sharding_type)


# --------------------------------------------------------- all-to-all bytes
def _all_to_all_bytes(dmp, kjt, proj) -> int:
    """Bytes of every ``all_to_all_single`` input in one forward and backward."""
    sent = []
    original = dist.all_to_all_single

    def counting(output, input, *args, **kwargs):
        sent.append(input.numel() * input.element_size())
        return original(output, input, *args, **kwargs)

    dist.all_to_all_single = counting
    try:
        (dmp(kjt).wait().values() * proj).sum().backward()
    finally:
        dist.all_to_all_single = original
    return sum(sent)


def _bytes_body(rank: int, world_size: int) -> None:
    kjt, proj = batches(0, world_size)[rank]
    memcom = shard(world_size, ShardingType.TABLE_WISE.value, "sgd", 0.1)
    # The same tables uncompressed in TorchRec's own collection: what a stock step moves.
    plain = [
        EmbeddingBagConfig(
            name=t.name, num_embeddings=t.num_embeddings, embedding_dim=t.embedding_dim,
            feature_names=t.feature_names, pooling=t.pooling,
        )
        for t in make_tables()
    ]
    stock = shard_with_planner(
        EmbeddingBagCollection(tables=plain, device=torch.device("meta")),
        [EmbeddingBagCollectionSharder(fused_params={"optimizer": OPT["sgd"], "learning_rate": 0.1})],
        {t.name: ShardingType.TABLE_WISE.value for t in plain},
    )
    sent = torch.tensor([_all_to_all_bytes(memcom, kjt, proj), _all_to_all_bytes(stock, kjt, proj)])
    # Per rank the bytes depend on where the planner put each table; over all ranks they do not.
    dist.all_reduce(sent)
    # Table-wise MEmCom ids travel unhashed and without weights: a stock unweighted EBC's bytes.
    assert sent[0] == sent[1], sent.tolist()


def test_table_wise_all_to_all_moves_a_stock_ebcs_bytes() -> None:
    run_multiprocess(_bytes_body, world_size=2)


# ------------------------------------------- weighted input, the hashing trick
def _weighted_hashing_body(rank: int, world_size: int, sharding_type: str) -> None:
    # Per-id input weights ride with unhashed ids (table-wise) or hashed ones (row-wise)
    # and scale U's rows on the owner; w is frozen at 1 (the hashing trick).
    tables = [
        dataclasses.replace(t, train_entity_weights=False) if isinstance(t, MEmComEmbeddingBagConfig) else t
        for t in make_tables()
    ]
    torch.manual_seed(0)
    ref = MEmComEmbeddingBagCollection(tables, is_weighted=True)
    model = MEmComEmbeddingBagCollection(tables, is_weighted=True, device=torch.device("meta"))
    sharder = MEmComEmbeddingBagCollectionSharder(fused_params={"optimizer": OPT["sgd"], "learning_rate": 0.1})
    dmp = shard_with_planner(model, [sharder], {t.name: sharding_type for t in tables})
    load_unsharded_state_dict(dmp, ref.state_dict())
    opt = ReferenceOptimizer("sgd", 0.1)
    for step in range(2):
        data = []
        for r, (kjt, proj) in enumerate(batches(step, world_size)):
            g = torch.Generator().manual_seed(50 + 10 * step + r)
            weights = torch.rand(kjt.values().numel(), generator=g) + 0.5
            data.append((KeyedJaggedTensor.from_lengths_sync(kjt.keys(), kjt.values(), kjt.lengths(), weights), proj))
        kjt, proj = data[rank]
        out = in_key_order(dmp(kjt).wait(), KEYS)  # the plan orders the keys by rank here
        expected, _ = reference_step(ref, opt, data, world_size)
        torch.testing.assert_close(out, expected[rank], atol=1e-5, rtol=1e-5)
        (out * proj).sum().backward()
        got = gather_unsharded_state_dict(dmp, dst=None)
        for name, value in ref.state_dict().items():
            torch.testing.assert_close(got[name], value, atol=1e-5, rtol=1e-5, msg=lambda m: f"step {step} {name}: {m}")


@pytest.mark.parametrize("sharding_type", [ShardingType.TABLE_WISE.value, ShardingType.ROW_WISE.value])
def test_weighted_input_with_the_hashing_trick_matches_unsharded(sharding_type: str) -> None:
    run_multiprocess(_weighted_hashing_body, world_size=2, sharding_type=sharding_type)
