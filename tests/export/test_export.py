"""Export: slim model == TorchRec model, .pte == eager, operators, compact variant, bad input."""

import glob
import json
import os
import shutil
from dataclasses import asdict
from typing import Callable, Dict, List, Tuple

import pyarrow.parquet as pq
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
from memcom_torchrec.models.builder import build_model
from memcom_torchrec.models.checkpoint import save_checkpoint, table_signature
from memcom_torchrec.models.next_item import NextItemTrain
from memcom_torchrec.modules.methods import method_names
from memcom_torchrec.train.config import TrainConfig

NUM_USERS, NUM_ITEMS, DIM = 50, 120, 16
METHODS = method_names()
BATCHES = [1, 4, 37, 256]


def tiny_model(method: str, seed: int = 0, **overrides):
    """A NextItemTrain with random (non-trivial) weights on CPU, and its config."""
    cfg = TrainConfig(method=method, compression_ratio=4.0 if method != "uncompressed" else 1.0,
                      embedding_dim=DIM, hidden=[32], **overrides)
    torch.manual_seed(seed)  # the tables' init; build_model seeds the dense layers with cfg.seed
    model, tables = build_model(cfg, NUM_USERS, NUM_ITEMS, torch.device("cpu"), seed=cfg.seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_entity_weights" in name:  # MEmCom's and memcom_qr's w: around 1, but not 1
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
    if method == "hashing":
        assert slim.history.info.roles == ("U",) and not hasattr(slim.history, "entity_weights")
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


# Roles of a lookup's tensors -> the compact module storing them (see SlimLookup).
ROW_MODULES = {"weight": "rows", "U": "rows", "Q": "quotient", "R": "remainder"}


def quantize_reference(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The documented compact row format, recomputed here: ``(q, scale, bias)`` of a float table.

    Per row: ``scale = fp16((max - min) / 255)``, ``bias = fp16(min)``, and
    ``q = clamp(round((x - bias) / scale), 0, 255)`` (uint8) against the rounded
    scale and bias; a constant row (scale 0) stores ``q = 0``.
    """
    lo, hi = x.min(dim=1).values, x.max(dim=1).values
    scale, bias = ((hi - lo) / 255.0).half(), lo.half()
    s, b = scale.float().unsqueeze(1), bias.float().unsqueeze(1)
    q = torch.round((x - b) / torch.where(s > 0, s, torch.ones_like(s))).clamp(0, 255)
    return torch.where(s > 0, q, torch.zeros_like(q)).to(torch.uint8), scale, bias


def fp16_rounding_bound(v: torch.Tensor) -> torch.Tensor:
    """``|float16(v) - v|`` is at most ``2^-11 |v|`` (round to nearest, 10-bit mantissa) plus ``2^-25`` (subnormals)."""
    return 2.0 ** -11 * v.abs() + 2.0 ** -25


def row_error_bound(x: torch.Tensor) -> torch.Tensor:
    """Per-row bound on ``|dequantised - x|`` of the documented format, from the table alone.

    With ``s = (max - min) / 255``, float16 stores ``scale`` within ``r(s)`` of ``s`` and
    ``bias`` within ``r(min)`` of ``min`` (``r = fp16_rounding_bound``). The grid
    ``bias + k * scale`` (k = 0..255) then has spacing at most ``s + r(s)`` and leaves
    ``[min, max]`` uncovered by at most ``r(min) + 255 r(s)`` at either end. Rounding
    to the nearest k lands within half a spacing inside the grid's span; clamping lands
    within the uncovered part outside it. So ``|error| <= (s + r(s)) / 2 + r(min) + 255 r(s)``,
    plus float32 rounding (``4e-6 * max|x|``).
    """
    x = x.double()
    lo, hi = x.min(dim=1).values, x.max(dim=1).values
    s = (hi - lo) / 255
    bound = (s + fp16_rounding_bound(s)) / 2 + fp16_rounding_bound(lo) + 255 * fp16_rounding_bound(s)
    return (bound + 4e-6 * x.abs().amax(dim=1)).float()


def embedding_factors(tables: Dict[str, torch.Tensor], ids: torch.Tensor) -> List[torch.Tensor]:
    """Per-id factors whose product is the embedding.

    Plain ``T[i]``; hashing ``U[i mod m]``; QR ``Q[i // m]``, ``R[i mod m]``; MEmCom(-QR) also ``w[i]``.
    """
    out = [tables["w"][ids].unsqueeze(1)] if "w" in tables else []
    if "weight" in tables:
        return out + [tables["weight"][ids]]
    if "U" in tables:
        return out + [tables["U"][ids % tables["U"].shape[0]]]
    m = tables["R"].shape[0]
    return out + [tables["Q"][ids // m], tables["R"][ids % m]]


def embed(tables: Dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """``len(ids) x d`` embeddings computed from float tables."""
    return torch.stack(torch.broadcast_tensors(*embedding_factors(tables, ids))).prod(dim=0)


def embed_error_bound(
    tables: Dict[str, torch.Tensor], bounds: Dict[str, torch.Tensor], ids: torch.Tensor
) -> torch.Tensor:
    """Bound on ``|embed(approx, ids) - embed(tables, ids)|`` when ``|approx - tables| <= bounds`` entry-wise.

    For factors ``f`` and errors ``|e| <= d``: ``|prod(f + e) - prod(f)| <= prod(|f| + d) - prod(|f|)``.
    """
    f = torch.stack(torch.broadcast_tensors(*embedding_factors(tables, ids))).abs()
    d = torch.stack(torch.broadcast_tensors(*embedding_factors(bounds, ids)))
    return (f + d).prod(dim=0) - f.prod(dim=0)


def mlp_input(
    embed_fn: Callable[[str, torch.Tensor], torch.Tensor], ids: torch.Tensor, lengths: torch.Tensor, users: torch.Tensor
) -> torch.Tensor:
    """``[mean of the history's embeddings, the user's embedding]`` per row (the item table pools by mean)."""
    bag = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    history = torch.zeros(len(lengths), DIM).index_add_(0, bag, embed_fn("history", ids))
    return torch.cat([history / lengths.clamp(min=1).unsqueeze(1), embed_fn("user", users)], dim=1)


def dense_error_bound(model: torch.nn.Module, features: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """Bound on the logits' error when every MLP input entry (``features``) is off by at most ``bound``.

    Linear: an input error ``e`` becomes ``W e`` and ``|W e| <= |W| |e|`` entry-wise. ReLU at a
    pre-activation ``h`` off by at most ``e``: ``|relu(h') - relu(h)| <= min(e, max(h + e, 0))``
    (1-Lipschitz, and both outputs are 0 when ``h + e <= 0``). Dropout (eval) is the identity.
    Computed in float64 from the float32 model's activations.
    """
    h, e = features.double(), bound.double()
    for layer in [*model.model.mlp, model.model.output]:
        if isinstance(layer, torch.nn.Linear):
            h = torch.nn.functional.linear(h, layer.weight.double(), layer.bias.double())
            e = e @ layer.weight.double().abs().T
        elif isinstance(layer, torch.nn.ReLU):
            e = torch.minimum(e, (h + e).clamp(min=0))
            h = h.clamp(min=0)
        else:
            assert isinstance(layer, torch.nn.Dropout), f"no error bound for {layer}"
    return e.float()


@pytest.mark.parametrize("method", METHODS)
def test_compact_export_equals_independent_quantization(method):
    """Compact tables == the documented format recomputed here; logits within the error it implies."""
    model, _ = tiny_model(method)
    fp32, compact = build_slim_model(model), build_slim_model(model, "compact")
    exact: Dict[str, Dict[str, torch.Tensor]] = {}
    dequant: Dict[str, Dict[str, torch.Tensor]] = {}
    bounds: Dict[str, Dict[str, torch.Tensor]] = {}
    for feature in ("history", "user"):
        exact[feature], dequant[feature], bounds[feature] = getattr(fp32, feature).dequantized_tables(), {}, {}
        stored = getattr(compact, feature)
        for role, x in exact[feature].items():
            where = f"{method} {feature} {role}"
            if role == "w":  # float16, rounded to nearest
                w16 = stored.entity_weights.weight
                assert w16.dtype == torch.float16, f"{where}: {w16.dtype}"
                assert torch.equal(w16.reshape(-1), x.half()), f"{where}: not w rounded to float16"
                dequant[feature][role] = x.half().float()
                bounds[feature][role] = fp16_rounding_bound(x)
                continue
            table = getattr(stored, ROW_MODULES[role])
            # the stored rows, dequantised here, are within the error the row's quantisation step allows
            sb = table.scale_bias.float()
            row_bound = row_error_bound(x)[:, None].expand_as(x)
            err = (table.q.float() * sb[:, :1] + sb[:, 1:] - x).abs()
            assert table.q.dtype == torch.uint8, f"{where}: {table.q.dtype}"
            assert (err <= row_bound).all(), (
                f"{where}: dequantised error {err.max():.3g} above its bound {row_bound.flatten()[err.argmax()]:.3g}"
            )
            bounds[feature][role] = row_bound
            # and they are exactly the documented format
            q, scale, bias = quantize_reference(x)
            assert table.scale_bias.dtype == torch.float16, f"{where}: scale/bias {table.scale_bias.dtype}"
            assert torch.equal(table.scale_bias, torch.stack([scale, bias], dim=1)), f"{where}: scale/bias differ"
            assert torch.equal(table.q, q), f"{where}: {int((table.q != q).sum())} of {q.numel()} q differ"
            dequant[feature][role] = q.float() * scale.float()[:, None] + bias.float()[:, None]

    def dense(features: torch.Tensor) -> torch.Tensor:
        return model.model.output(model.model.mlp(features))

    with torch.no_grad():
        for b in BATCHES:
            x = make_inputs(b, seed=20 + b)
            want, got = torchrec_logits(model, *x), compact(*x)
            # the forward written here computes the TorchRec model from its float tables
            features = mlp_input(lambda f, i: embed(exact[f], i), *x)
            torch.testing.assert_close(dense(features), want, atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"{method} batch {b}: the forward written here vs TorchRec: {m}")
            # the compact model's error versus fp32 is within the bound the quantisation implies (+ float32 rounding)
            input_bound = mlp_input(lambda f, i: embed_error_bound(exact[f], bounds[f], i), *x)
            bound = dense_error_bound(model, features, input_bound)
            err = (got - want).abs()
            assert (err <= bound + 1e-5).all(), (
                f"{method} batch {b}: compact vs fp32 error {err.max():.3g} above the derived bound "
                f"{bound.flatten()[err.argmax()]:.3g} at that logit"
            )
            # and it computes with the tables dequantised here (up to float32 rounding)
            computed_here = dense(mlp_input(lambda f, i: embed(dequant[f], i), *x))
            torch.testing.assert_close(got, computed_here, atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"{method} batch {b}: compact vs the tables dequantised here: {m}")


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
    # tensors of the wrong shape in the checkpoint: config and table signatures claim dim 32 (and its
    # bucket count), so the checks of meta.json pass and loading the dim-16 tensors fails
    wide, _ = build_model(TrainConfig(method="memcom", compression_ratio=4.0, embedding_dim=32, hidden=[32]),
                          NUM_USERS, NUM_ITEMS, torch.device("cpu"))

    def bigger(m):
        m["config"]["embedding_dim"] = 32
        m["tables"] = table_signature(wide)
    with pytest.raises(ValueError, match=r"does not match its config: .*Size mismatch between saved "
                                         r"torch\.Size\(\[22, 16\]\) and current: torch\.Size\(\[26, 32\]\) "
                                         r"for .*embedding_bags\.item\.weight"):
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
    # a QR checkpoint whose config claims memcom_qr: refused by the table signature, before DCP
    _, qr = save_tiny(str(tmp_path / "q"), "qr")
    path = str(tmp_path / "qr_claims_memcom_qr")
    shutil.copytree(qr, path)
    _edit_meta(path, lambda m: m["config"].update(method="memcom_qr"))
    with pytest.raises(ValueError, match=r"table 'model.embeddings:item' differs .*'entity_weights': \(None, True\)"):
        load_trained_model(path)
    # The model is rebuilt from its own fields (models.config.ModelConfig): a training flag it does
    # not depend on (here one this version lacks) is ignored, a bad model field is refused.
    model, _ = load_trained_model(broken("unknown", lambda m: m["config"].update(colour="red")))
    assert isinstance(model, NextItemTrain)
    with pytest.raises(ValueError, match="incompatible config: unknown model 'deep'"):
        load_trained_model(broken("kind", lambda m: m["config"].update(model="deep")))
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
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "data", "ml-100k")
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
    torch.manual_seed(0)
    model, tables = build_model(cfg, int(manifest["num_users"]), int(manifest["num_items"]), torch.device("cpu"),
                                seed=cfg.seed)
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
        for batch in make_dataloader(data, "test", 256, history_len=cfg.history_len, num_workers=0):
            x = kjt_to_inputs(batch.sparse_features)
            ex = batch.exclude
            for name, slim in (("fp32", fp32), ("compact", compact)):
                ranks = target_ranks(slim(*x), batch.labels, ex.lengths(), ex.values())
                totals[name] = totals[name].add(ranking_totals(ranks, 10))
    a, b = totals["fp32"].mean_ndcg, totals["compact"].mean_ndcg
    # every row of the test split (one per user: leave-last-out), counted in its files, not by the loader
    test_rows = sum(pq.read_metadata(f).num_rows for f in glob.glob(os.path.join(data, "test", "*.parquet")))
    assert test_rows == int(manifest["num_users"]) > 0
    counts = {name: t.count for name, t in totals.items()}
    assert counts == {"fp32": test_rows, "compact": test_rows}, f"evaluated {counts}; the test split has {test_rows}"
    assert a > 0.02, f"the tiny model did not learn (nDCG@10 {a:.4f})"
    assert abs(b - a) <= 0.01 * a, f"compact nDCG@10 {b:.5f} vs fp32 {a:.5f}"
