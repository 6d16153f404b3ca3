"""The plain-PyTorch replica used for ML-1M sweeps computes what the product computes.

scripts/reference_sweep.py chose the ML-1M hyperparameters on a GPU without
TorchRec; these tests tie it to the real collections (forward and gradients of
the pooled history per method) and to the reference optimizers.
"""

import os
import sys

import pytest
import torch
from torchrec import KeyedJaggedTensor, PoolingType
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from memcom_torchrec import MEmComEmbeddingBagCollection, MEmComEmbeddingBagConfig
from memcom_torchrec.modules.memcom_embedding_modules import entity_weights_to_dense
from memcom_torchrec.modules import QREmbeddingBagCollection, QREmbeddingBagConfig, num_collisions_for_ratio
from memcom_torchrec.modules.memcom_configs import memcom_storage, num_buckets_for_ratio
from memcom_torchrec.modules.lowrank_configs import LowRankEmbeddingBagConfig
from memcom_torchrec.modules.lowrank_embedding_modules import LowRankEmbeddingBagCollection
from memcom_torchrec.modules.mixed_dim_configs import MixedDimEmbeddingBagConfig
from memcom_torchrec.modules.mixed_dim_embedding_modules import MixedDimEmbeddingBagCollection
from memcom_torchrec.modules.qr_configs import qr_storage
from memcom_torchrec.modules.storage import plain_storage, table_storage
from reference import adagrad_, rowwise_adagrad_

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "scripts"))
import reference_sweep as rs  # noqa: E402

N, D = 53, rs.DIM
# The roles of each method's tensors, as its collection's dense_tables hands them to the pack step.
ROLES = {"uncompressed": ["weight"], "memcom": ["U", "w"], "hashing": ["U"], "qr": ["Q", "R"], "memcom_qr": ["Q", "R", "w"]}


def replica_table(method: str, n: int, size: int) -> rs.ItemTable:
    """The replica's table of ``method`` with ``size`` rows of ``U`` (``m``) or of ``R`` (``p``), laid out as the
    package's storage description says (what the pack step writes)."""
    if method == "uncompressed":
        storage = plain_storage(EmbeddingBagConfig(name="item", num_embeddings=n, embedding_dim=D, feature_names=["h"]))
    elif method in ("memcom", "hashing"):
        storage = memcom_storage("item", n, D, size, train_entity_weights=method == "memcom")
    else:
        storage = qr_storage("item", n, D, size, entity_weights=method == "memcom_qr")
    assert list(storage.roles) == ROLES[method]
    return rs.ItemTable(rs.layout_of(storage), n)


def histories(batch: int = 6, seed: int = 0) -> torch.Tensor:
    """``B x HISTORY`` ids padded with -1 (row 0 empty, row 1 full, the rest ragged)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randint(0, N, (batch, rs.HISTORY), generator=g)
    lengths = torch.randint(1, rs.HISTORY + 1, (batch,), generator=g)
    lengths[0], lengths[1] = 0, rs.HISTORY
    h[torch.arange(rs.HISTORY).unsqueeze(0) >= lengths.unsqueeze(1)] = -1
    return h


def as_kjt(h: torch.Tensor) -> KeyedJaggedTensor:
    mask = h >= 0
    return KeyedJaggedTensor.from_lengths_sync(keys=["history"], values=h[mask], lengths=mask.sum(1))


def replica_pooled(table: rs.ItemTable, h: torch.Tensor) -> torch.Tensor:
    """The replica's pooling (Replica.forward without the user and MLP)."""
    mask = h >= 0
    v = table(h.clamp(min=0)) * mask.unsqueeze(-1)
    return v.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)


@pytest.mark.parametrize(
    "method,size", [("uncompressed", N), ("memcom", 7), ("hashing", 9), ("qr", 6), ("memcom_qr", 6)]
)
def test_replica_item_table_matches_collection(method: str, size: int) -> None:
    common = dict(name="item", num_embeddings=N, embedding_dim=D, feature_names=["history"], pooling=PoolingType.MEAN)
    torch.manual_seed(0)
    table = replica_table(method, N, size)
    if method == "uncompressed":
        from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

        real = EmbeddingBagCollection([EmbeddingBagConfig(**common)])
        u = real.embedding_bags["item"].weight
        real_params, replica_params = [u], [table.table]
        with torch.no_grad():
            table.table.copy_(u)
    elif method in ("qr", "memcom_qr"):
        weighted = method == "memcom_qr"
        real = QREmbeddingBagCollection([QREmbeddingBagConfig(num_collisions=size, entity_weights=weighted, **common)])
        q, r = real.qr_parameters("item")
        with torch.no_grad():
            r.uniform_(0.5, 1.5)
            table.table.copy_(q)
            table.remainder.copy_(r)
        real_params, replica_params = [q, r], [table.table, table.remainder]
        if weighted:
            w = real.entity_weights("item")  # one scalar per entity, as the replica's
            with torch.no_grad():
                w.uniform_(0.5, 1.5)
                table.w.copy_(w)
            real_params.append(w)
            replica_params.append(table.w)
    else:
        cfg = MEmComEmbeddingBagConfig(num_buckets=size, train_entity_weights=method == "memcom", **common)
        real = MEmComEmbeddingBagCollection([cfg])
        u, w = real.memcom_parameters("item")
        replica_params = [table.table]
        with torch.no_grad():
            table.table.copy_(u)
            if method == "memcom":
                grid = real._entity_weights["item"]
                grid.uniform_(0.5, 1.5)
                table.w.copy_(real.memcom_parameters("item")[1])
                replica_params.append(table.w)
        real_params = [u] + ([real._entity_weights["item"]] if method == "memcom" else [])
    h = histories()
    got = replica_pooled(table, h)
    expected = real(as_kjt(h))["history"]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)

    proj = torch.randn_like(got)
    g_replica = torch.autograd.grad((got * proj).sum(), replica_params)
    g_real = torch.autograd.grad((expected * proj).sum(), real_params)
    for a, b in zip(g_replica, g_real):
        if a.shape != b.shape:  # MEmCom's w: the replica's dense vector vs the collection's (m, Q) grid
            b = entity_weights_to_dense(b, N)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_replica_mixed_dim_table_matches_collection() -> None:
    """The replica's ``head[s]`` / ``P tail[s - h]`` equals the mixed-dimension collection: output and gradients."""
    cfg = MixedDimEmbeddingBagConfig(name="item", num_embeddings=N, embedding_dim=D, feature_names=["history"],
                                     pooling=PoolingType.MEAN, head_rows=11, tail_dim=8)
    torch.manual_seed(0)
    real = MixedDimEmbeddingBagCollection([cfg])
    real.set_assignment("item", torch.randperm(N))
    storage = table_storage(cfg)
    tensors = real.dense_tables("item")
    table = rs.ItemTable({**rs.layout_of(storage), "slots": tensors["slots"]}, N)
    with torch.no_grad():
        table.table.copy_(tensors["head"])
        table.tail.copy_(tensors["tail"])
        table.projection.copy_(tensors["P"])
    h = histories()
    got, expected = replica_pooled(table, h), real(as_kjt(h))["history"]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    proj = torch.randn_like(got)
    g_replica = torch.autograd.grad((got * proj).sum(), [table.table, table.tail, table.projection])
    g_real = torch.autograd.grad((expected * proj).sum(), [tensors["head"], tensors["tail"], tensors["P"]])
    for a, b in zip(g_replica, g_real):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_replica_lowrank_table_matches_collection() -> None:
    """The replica's ``P A[i]`` equals the low-rank collection: pooled output, gradients of A and P."""
    cfg = LowRankEmbeddingBagConfig(name="item", num_embeddings=N, embedding_dim=D, feature_names=["history"],
                                    pooling=PoolingType.MEAN, rank=8)
    torch.manual_seed(0)
    real = LowRankEmbeddingBagCollection([cfg])
    storage = table_storage(cfg)
    table = rs.ItemTable(rs.layout_of(storage), N)
    tensors = real.dense_tables("item")
    with torch.no_grad():
        table.table.copy_(tensors["A"])
        table.projection.copy_(tensors["P"])
    h = histories()
    got, expected = replica_pooled(table, h), real(as_kjt(h))["history"]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    proj = torch.randn_like(got)
    g_replica = torch.autograd.grad((got * proj).sum(), [table.table, table.projection])
    g_real = torch.autograd.grad((expected * proj).sum(), [tensors["A"], tensors["P"]])
    for a, b in zip(g_replica, g_real):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method,size", [("uncompressed", 1), ("memcom", 7), ("hashing", 9), ("qr", 6), ("memcom_qr", 6)])
def test_replica_init_matches_collections(method: str, size: int) -> None:
    """Tables start as the product's do: uniform +-sqrt(1/n) (n: entities, not rows), R = 1, w = 1."""
    n = 5000
    # Seeded: the largest |value| of a 7 x 64 table misses the top 1% below the bound for ~1.5% of seeds.
    torch.manual_seed(0)
    table = replica_table(method, n, size)
    bound = (1.0 / n) ** 0.5
    assert bound * 0.99 < float(table.table.detach().abs().max()) <= bound
    if method in ("qr", "memcom_qr"):
        assert torch.all(table.remainder == 1.0)
    if method.startswith("memcom"):
        assert torch.all(table.w == 1.0)
    if method in ("memcom", "hashing"):  # the product's bound for the same table, unsharded
        cfg = MEmComEmbeddingBagConfig(name="t", num_embeddings=n, embedding_dim=D, feature_names=["f"],
                                       num_buckets=size, train_entity_weights=method == "memcom")
        torch.manual_seed(0)
        u, _ = MEmComEmbeddingBagCollection([cfg]).memcom_parameters("t")
        assert bound * 0.99 < float(u.detach().abs().max()) <= bound


def test_replica_optimizer_matches_reference() -> None:
    torch.manual_seed(0)
    table, vec = torch.randn(8, 4), torch.randn(8)
    p_table, p_vec = table.clone().requires_grad_(), vec.clone().requires_grad_()
    opt = rs.RowwiseAdagrad([p_table, p_vec], lr=0.1)
    s_table, s_vec = torch.zeros(8), torch.zeros(8)
    before = p_table.detach().clone()
    for step in range(3):
        g_table, g_vec = torch.randn(8, 4), torch.randn(8)
        g_table[step] = 0.0  # a row no id touched
        p_table.grad, p_vec.grad = g_table.clone(), g_vec.clone()
        opt.step()
        rowwise_adagrad_(table, g_table, s_table, 0.1, 1e-8)
        adagrad_(vec, g_vec, s_vec, 0.1, 1e-8)
        torch.testing.assert_close(p_table.detach(), table)
        torch.testing.assert_close(p_vec.detach(), vec)
        assert torch.equal(p_table.detach()[step], before[step])  # no decay or momentum moves it
        before = p_table.detach().clone()


def test_replica_ranks_like_the_metric_code() -> None:
    """The replica's nDCG@10 equals eval.metrics on the same scores (exclusions, ties)."""
    from memcom_torchrec.eval.metrics import ranking_totals, target_ranks

    class Fixed(torch.nn.Module):
        def __init__(self, scores: torch.Tensor) -> None:
            super().__init__()
            self.s = scores

        def forward(self, user: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
            return self.s[user.long()]

        def eval(self):  # noqa: D102
            return self

        def train(self, mode: bool = True):  # noqa: D102
            return self

    g = torch.Generator().manual_seed(0)
    b, n = 45, 30  # several evaluation chunks of 8 (and a short last one)
    scores = torch.randint(0, 5, (b, n), generator=g).float()  # many ties
    lengths = torch.randint(0, 6, (b,), generator=g)
    values = torch.randint(0, n, (int(lengths.sum()),), generator=g)
    split = {"user": torch.arange(b, dtype=torch.int32), "item": torch.randint(0, n, (b,), generator=g).int(),
             "history": torch.zeros(b, 1, dtype=torch.int16), "exclude_lengths": lengths.int(),
             "exclude_values": values.to(torch.int16)}
    scores[3] = float("nan")  # a diverged row ranks last
    scores[5, 7] = float("nan")
    got = rs.evaluate(Fixed(scores), split, n, chunk=8)
    totals = ranking_totals(target_ranks(scores, split["item"], lengths, values))
    assert got["ndcg"] == pytest.approx(totals.mean_ndcg)
    assert got["hr"] == pytest.approx(totals.mean_hr)


@pytest.mark.slow
def test_pack_run_report_on_ml100k(ml100k_dir: str, tmp_path) -> None:
    """The sweep's three steps end to end, as used on the GPU: pack and report here (in this process),
    run as the command line on the GPU machine (one short run in a worker process)."""
    import json
    import subprocess

    script = os.path.join(os.path.dirname(rs.__file__), "reference_sweep.py")
    packed, results, table = str(tmp_path / "p.pt"), str(tmp_path / "r.jsonl"), str(tmp_path / "t.md")
    rs.pack(ml100k_dir, packed)
    pack = torch.load(packed)
    layouts = pack["layouts"]
    assert pack["baseline"] == "uncompressed" and pack["methods"] == [
        "hashing", "memcom", "qr", "memcom_qr", "memcom_2hash", "memcom_freq", "lowrank", "mixed_dim"]  # clustered: a warm-up
    assert layouts["memcom_2hash@16.0"]["roles"] == ["U", "rows", "w"] and layouts["memcom_2hash@16.0"]["rows"].shape == (1682, 2)
    freq = layouts["memcom_freq@16.0"]["rows"][:, 0]
    top = torch.argsort(-torch.bincount(pack["train"]["item"].long(), minlength=1682), stable=True)[0]
    assert int((freq == freq[top]).sum()) == 1  # the most frequent item alone in its row
    slots = layouts["mixed_dim@4.0"]["slots"]  # by frequency: the most frequent item has slot 0
    assert int(slots[top]) == 0 and torch.equal(torch.sort(slots.long()).values, torch.arange(1682))
    assert "qr@40.0" not in layouts  # 40x is beyond QR for 1,682 items
    # sizes from the package's own rules (the registry's table configs)
    m, p = num_buckets_for_ratio(1682, D, 16.0), num_collisions_for_ratio(1682, 16.0)
    assert layouts["memcom@16.0"] == {"roles": ["U", "w"], "shapes": {"U": [m, D], "w": [1682]}}
    assert layouts["qr@16.0"] == {"roles": ["Q", "R"], "shapes": {"Q": [-(-1682 // p), D], "R": [p, D]}}
    assert layouts["memcom_qr@8.0"]["roles"] == ["Q", "R", "w"]
    assert layouts["uncompressed@1.0"] == {"roles": ["weight"], "shapes": {"weight": [1682, D]}}
    subprocess.run([sys.executable, script, "run", "--pack", packed, "--out", results, "--procs", "1", "--epochs", "1",
                    "--lrs", "0.1", "--seeds", "--cells", "uncompressed@1.0", "memcom@16.0", "memcom_2hash@16.0"],
                   check=True)
    rows = [json.loads(line) for line in open(results)]
    assert sorted(r["method"] for r in rows) == ["memcom", "memcom_2hash", "uncompressed"]
    assert all(0.0 < r["test_ndcg"] < 1.0 for r in rows)
    rs.report(results, table)
    assert "| memcom | 16x |" in open(table).read()


@pytest.mark.parametrize("options", [dict(num_hashes=2), dict(assignment="frequency", head_fraction=0.3)],
                         ids=["2hash", "frequency"])
def test_replica_variant_table_matches_collection(options) -> None:
    """The replica's ``U``/``rows``/``w`` table equals the collection: pooled output, gradients of U and w."""
    common = dict(name="item", num_embeddings=N, embedding_dim=D, feature_names=["history"], pooling=PoolingType.MEAN)
    torch.manual_seed(0)
    real = MEmComEmbeddingBagCollection([MEmComEmbeddingBagConfig(num_buckets=7, **common, **options)])
    cfg = real.embedding_bag_configs()[0]
    if cfg.stores_assignment:
        real.set_assignment("item", torch.randperm(cfg.assignment_cells)[:N])
    with torch.no_grad():
        real._entity_weights["item"].uniform_(0.5, 1.5)
    tensors = real.dense_tables("item")
    storage = table_storage(cfg)
    table = rs.ItemTable({**rs.layout_of(storage), "rows": tensors["rows"]}, N)
    with torch.no_grad():
        table.table.copy_(tensors["U"])
        table.w.copy_(tensors["w"].reshape(-1))
    h = histories()
    got = replica_pooled(table, h)
    expected = real(as_kjt(h))["history"]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    proj = torch.randn_like(got)
    g_u, g_w = torch.autograd.grad((got * proj).sum(), [table.table, table.w])
    grid = real._entity_weights["item"]
    r_u, r_grid = torch.autograd.grad((expected * proj).sum(), [real._embedding_bag_collection.embedding_bags["item"].weight, grid])
    rows, cols = real.entity_cells("item")
    torch.testing.assert_close(g_u, r_u, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g_w, r_grid[rows, cols].reshape(-1), atol=1e-6, rtol=1e-5)
