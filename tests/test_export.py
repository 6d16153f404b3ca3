"""Export: slim model == TorchRec model, .pte == eager, operators, compact variant, bad input."""

import json
import os
import shutil
from dataclasses import asdict

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from memcom_torchrec.export import (
    build_slim_model,
    dequantized_twin,
    embedding_bytes,
    export_program,
    load_trained_model,
    segment_sum,
    write_programs,
)
from memcom_torchrec.models.embeddings import build_collection
from memcom_torchrec.train.checkpoint import save_checkpoint, table_signature
from memcom_torchrec.train.trainer import TrainConfig, build_model

NUM_USERS, NUM_ITEMS = 50, 120
METHODS = ["uncompressed", "hashing", "memcom", "qr", "memcom_qr"]
BATCHES = [1, 4, 37, 256]


def tiny_model(method: str, seed: int = 0, **overrides):
    """A NextItemTrain with random (non-trivial) weights on CPU, and its config."""
    cfg = TrainConfig(method=method, compression_ratio=4.0 if method != "uncompressed" else 1.0,
                      embedding_dim=16, hidden=[32], **overrides)
    model, tables = build_model(cfg, NUM_USERS, NUM_ITEMS, torch.device("cpu"))
    model.model.embeddings = build_collection(tables, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_entity_weights" in name or "__w." in name:  # MEmCom (and MEmCom-QR) w: around 1, but not 1
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval(), cfg


def save_tiny(root: str, method: str, seed: int = 0):
    model, cfg = tiny_model(method, seed)
    path = save_checkpoint(root, 1, model, meta={"config": asdict(cfg)})
    return model, path


def make_inputs(batch: int, seed: int, max_len: int = 12):
    """Random requests; every other row has an empty history."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_len + 1, (batch,), generator=g)
    lengths[::2] = 0 if batch > 1 else lengths[::2]
    if batch == 1 and seed % 2 == 0:
        lengths[0] = 0
    ids = torch.randint(0, NUM_ITEMS, (int(lengths.sum()),), generator=g)
    users = torch.randint(0, NUM_USERS, (batch,), generator=g)
    return ids, lengths, users


def torchrec_logits(model, ids, lengths, users):
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["history", "user_id"],
        values=torch.cat([ids, users]),
        lengths=torch.cat([lengths, torch.ones_like(users)]),
    )
    with torch.no_grad():
        return model.model(kjt)


# ---------------------------------------------------------------- eager slim
@pytest.mark.parametrize("method", METHODS)
def test_slim_model_equals_torchrec_model(method):
    model, _ = tiny_model(method)
    slim = build_slim_model(model)
    assert not any(type(m).__module__.split(".")[0] in ("torchrec", "fbgemm_gpu") for m in slim.modules())
    for b in BATCHES:
        x = make_inputs(b, seed=b)
        torch.testing.assert_close(slim(*x), torchrec_logits(model, *x), atol=1e-5, rtol=1e-5)
    ids, lengths, users = make_inputs(5, seed=1)
    if method == "hashing":
        assert slim.history.info.kind == "hashing" and not hasattr(slim.history, "entity_weights")
    if method in ("memcom", "memcom_qr"):
        assert slim.history.entity_weights.weight.shape == (NUM_ITEMS, 1)


def test_segment_sum_empty_bags():
    values = torch.arange(12, dtype=torch.float32).view(6, 2)
    out = segment_sum(values, torch.tensor([0, 2, 0, 4, 0]))
    expected = torch.tensor([[0, 0], [2, 4], [0, 0], [28, 32], [0, 0]], dtype=torch.float32)
    assert torch.equal(out, expected)
    assert torch.equal(segment_sum(torch.zeros(0, 2), torch.tensor([0, 0])), torch.zeros(2, 2))


def test_compact_tables_are_smaller_and_close():
    model, _ = tiny_model("memcom")
    fp32, compact = build_slim_model(model), build_slim_model(model, "compact")
    assert compact.history.rows.q.dtype == torch.uint8
    assert compact.history.entity_weights.weight.dtype == torch.float16
    assert embedding_bytes(compact) < 0.4 * embedding_bytes(fp32)
    x = make_inputs(37, seed=3)
    torch.testing.assert_close(compact(*x), fp32(*x), atol=0.05, rtol=0.05)
    torch.testing.assert_close(compact(*x), dequantized_twin(compact)(*x), atol=1e-5, rtol=1e-5)


def test_eager_bad_ids_name_the_feature():
    model, _ = tiny_model("memcom")
    slim = build_slim_model(model)
    ids, lengths, users = make_inputs(4, seed=5)
    with pytest.raises(ValueError, match=r"feature 'history': id 120 is out of range for table 'item' \(num_embeddings=120\)"):
        slim(torch.cat([ids, torch.tensor([NUM_ITEMS])]), lengths + torch.tensor([0, 0, 0, 1]), users)
    with pytest.raises(ValueError, match="feature 'user_id': id -1 is out of range for table 'user'"):
        slim(ids, lengths, torch.tensor([0, 1, -1, 2]))
    with pytest.raises(ValueError, match="lengths add up to"):
        slim(ids, lengths + 1, users)


# ------------------------------------------------------------- checkpoints
def test_checkpoint_roundtrip(tmp_path):
    model, path = save_tiny(str(tmp_path / "run" / "best"), "memcom")
    loaded, meta = load_trained_model(str(tmp_path / "run"))
    assert meta["config"]["method"] == "memcom"
    x = make_inputs(9, seed=2)
    torch.testing.assert_close(build_slim_model(loaded)(*x), torchrec_logits(model, *x), atol=1e-6, rtol=1e-6)


def _edit_meta(path, fn):
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    fn(meta)
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump(meta, f)


def test_bad_checkpoints(tmp_path):
    _, good = save_tiny(str(tmp_path / "a"), "memcom")

    def broken(name, fn):
        path = str(tmp_path / name)
        shutil.copytree(good, path)
        _edit_meta(path, fn)
        return path

    with pytest.raises(ValueError, match="no checkpoint at"):
        load_trained_model(str(tmp_path / "nowhere"))
    # a table the model has is missing from the checkpoint's tables
    with pytest.raises(ValueError, match="lists no table 'user'"):
        load_trained_model(broken("missing", lambda m: m["tables"].pop("model.embeddings:user")))
    with pytest.raises(ValueError, match="has table 'model.embeddings:extra', which the model lacks"):
        load_trained_model(broken("renamed", lambda m: m["tables"].update({"model.embeddings:extra": {}})))
    # the config says hashing, the checkpoint holds a MEmCom table
    with pytest.raises(ValueError, match="table 'model.embeddings:item' differs"):
        load_trained_model(broken("mismatch", lambda m: m["config"].update(method="hashing")))
    # tensors of the wrong shape in the checkpoint (config edited to a bigger dim everywhere)
    def bigger(m):
        m["config"]["embedding_dim"] = 32
        for sig in m["tables"].values():
            sig["embedding_dim"] = 32
    with pytest.raises(ValueError):
        load_trained_model(broken("shapes", bigger))
    # tensors missing from the checkpoint: a hashing checkpoint (no w) whose meta claims MEmCom
    memcom_model, _ = tiny_model("memcom")
    _, hashing = save_tiny(str(tmp_path / "h"), "hashing")

    def claim_memcom(m):
        m["config"]["method"] = "memcom"
        m["tables"] = table_signature(memcom_model)
    path = str(tmp_path / "claims_memcom")
    shutil.copytree(hashing, path)
    _edit_meta(path, claim_memcom)
    with pytest.raises(ValueError, match="does not match its config"):
        load_trained_model(path)
    with pytest.raises(ValueError, match="does not know"):
        load_trained_model(broken("unknown", lambda m: m["config"].update(colour="red")))
    with pytest.raises(ValueError, match="incompatible config"):
        load_trained_model(broken("ratio", lambda m: m["config"].update(compression_ratio=1.0)))
    with pytest.raises(ValueError, match="no 'config'"):
        load_trained_model(broken("noconfig", lambda m: m.pop("config")))


# ---------------------------------------------------------------- ExecuTorch
@pytest.mark.slow
@pytest.mark.parametrize(
    "method,backend,dtype",
    [("memcom", "portable", "fp32"), ("memcom", "xnnpack", "fp32"), ("uncompressed", "xnnpack", "fp32"),
     ("hashing", "xnnpack", "fp32"), ("qr", "portable", "fp32"), ("memcom", "xnnpack", "compact"),
     ("qr", "xnnpack", "compact"), ("memcom_qr", "xnnpack", "compact")],
)
def test_pte_equals_eager(tmp_path, method, backend, dtype):
    pytest.importorskip("executorch")
    from memcom_torchrec.export import load_pte, run_pte, unsupported_operators
    from memcom_torchrec.export.lowering import lower

    _, path = save_tiny(str(tmp_path / "ckpt"), method)
    model, _ = load_trained_model(path)
    slim = build_slim_model(model, dtype)
    reference = dequantized_twin(slim)  # for fp32: a copy
    program = export_program(slim, max_batch=256, max_history=16)
    et = lower(program, backend)
    # every operator (and backend) of the program is one this runtime provides
    missing_ops, missing_backends = unsupported_operators(et)
    assert missing_ops == [] and missing_backends == []
    ops = set(__import__("memcom_torchrec.export", fromlist=["x"]).program_operators(et))
    assert "aten::embedding.out" in ops and not any("embedding_bag" in o or "fbgemm" in o for o in ops)
    assert ("XnnpackBackend" in {d.id for p in et.executorch_program.execution_plan for d in p.delegates}) == (
        backend == "xnnpack"
    )
    res = write_programs(slim, str(tmp_path / "m.pte"), backend, max_batch=256, max_history=16, dtype=dtype)
    pte = load_pte(res.pte)
    saved = torch.export.load(res.pt2).module()
    for b in BATCHES + [2]:
        x = make_inputs(b, seed=10 + b)
        want = reference(*x)
        torch.testing.assert_close(run_pte(pte, x), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(saved(*x), want, atol=1e-5, rtol=1e-5)
    # a batch whose every history is empty (N = 0)
    x = (torch.zeros(0, dtype=torch.long), torch.zeros(3, dtype=torch.long), torch.tensor([0, 1, 2]))
    torch.testing.assert_close(run_pte(pte, x), reference(*x), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_exported_programs_reject_bad_input(tmp_path):
    pytest.importorskip("executorch")
    from memcom_torchrec.export import load_pte, run_pte

    model, _ = tiny_model("memcom")
    slim = build_slim_model(model)
    res = write_programs(slim, str(tmp_path / "m.pte"), "xnnpack", max_batch=64, max_history=16)
    pte, saved = load_pte(res.pte), torch.export.load(res.pt2).module()
    ids, lengths, users = make_inputs(4, seed=5)
    bad = [
        (torch.cat([ids, torch.tensor([NUM_ITEMS])]), lengths + torch.tensor([0, 0, 0, 1]), users),  # item id = n
        (torch.cat([ids, torch.tensor([-3])]), lengths + torch.tensor([0, 0, 0, 1]), users),  # negative id
        (ids, lengths, torch.tensor([0, 1, NUM_USERS, 2])),  # user id = n
        (ids, lengths + 1, users),  # lengths add up to more than the ids
        (torch.cat([ids, ids]), lengths, users),  # fewer
        (ids, torch.tensor([int(lengths.sum()) + 1, -1, 0, 0]), users),  # negative length
    ]
    assert torch.isfinite(run_pte(pte, (ids, lengths, users))).all()
    for x in bad:
        with pytest.raises(RuntimeError):
            run_pte(pte, x)
        with pytest.raises((IndexError, RuntimeError)):
            saved(*x)
    # the bounds are enforced: batch above max_batch is refused
    big = make_inputs(65, seed=1, max_len=1)
    with pytest.raises(RuntimeError):
        run_pte(pte, big)


@pytest.mark.slow
def test_cli(tmp_path):
    pytest.importorskip("executorch")
    from memcom_torchrec.export.cli import main

    save_tiny(str(tmp_path / "run" / "checkpoints"), "hashing")
    out = str(tmp_path / "out" / "model.pte")
    assert main(["--checkpoint", str(tmp_path / "run"), "--out", out, "--dtype", "compact",
                 "--max-batch", "8", "--max-history", "8"]) == 0
    assert os.path.getsize(out) > 0 and os.path.exists(str(tmp_path / "out" / "model.pt2"))
    assert main(["--checkpoint", str(tmp_path / "nowhere"), "--out", out]) == 2


# ------------------------------------------------------- quality on ML-100K
def _ml100k(tmp_path_factory) -> str:
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "ml-100k")
    if os.path.exists(os.path.join(here, "manifest.json")):
        return here
    from memcom_torchrec.data import prepare_movielens

    out = str(tmp_path_factory.mktemp("data") / "ml-100k")
    prepare_movielens("ml-100k", out)
    return out


@pytest.mark.slow
def test_compact_ndcg_within_one_percent_on_ml100k(tmp_path_factory):
    from memcom_torchrec.data import make_dataloader, read_manifest
    from memcom_torchrec.eval.metrics import RankingTotals, ranking_totals, target_ranks
    from memcom_torchrec.export import kjt_to_inputs

    data = _ml100k(tmp_path_factory)
    manifest = read_manifest(data)
    cfg = TrainConfig(method="memcom", compression_ratio=16.0, embedding_dim=32, hidden=[128])
    model, tables = build_model(cfg, int(manifest["num_users"]), int(manifest["num_items"]), torch.device("cpu"))
    model.model.embeddings = build_collection(tables, device=torch.device("cpu"))
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for batch in make_dataloader(data, "train", 512, shuffle=True, history_len=cfg.history_len, num_workers=0):
        loss, _ = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    fp32, compact = build_slim_model(model), build_slim_model(model, "compact")
    totals = {"fp32": RankingTotals(), "compact": RankingTotals()}
    with torch.no_grad():
        for batch in make_dataloader(data, "test", 1024, history_len=cfg.history_len, num_workers=0):
            x = kjt_to_inputs(batch.sparse_features)
            ex = batch.exclude
            for name, slim in (("fp32", fp32), ("compact", compact)):
                ranks = target_ranks(slim(*x), batch.labels, ex.lengths(), ex.values())
                totals[name] = totals[name].add(ranking_totals(ranks, 10))
    a, b = totals["fp32"].mean_ndcg, totals["compact"].mean_ndcg
    assert totals["fp32"].count == int(manifest.get("num_users", totals["fp32"].count)) or totals["fp32"].count > 0
    assert a > 0.02, f"the tiny model did not learn (nDCG@10 {a:.4f})"
    assert abs(b - a) <= 0.01 * a, f"compact nDCG@10 {b:.5f} vs fp32 {a:.5f}"
