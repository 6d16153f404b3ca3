"""Phone-shaped models and scorers against a plain-PyTorch reference, and sharded against unsharded.

The reference computes every item's vector from the table's tensors by role
(``e_i = w_i * U[i mod m]``, ``Q[i // p] * R[i mod p]``, ...), pools the history
with a mean, and scores with explicit formulas: ``tied`` ``<q, e_i> + b_i``;
RankNet ``dot`` ``<q, e_i>`` and ``mlp`` a ``Linear(2d, d)`` over the
concatenation ``[q, e_i]`` (the model splits that layer in two halves).
"""

from typing import Dict

import pytest
import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from memcom_torchrec.models.builder import build_model
from memcom_torchrec.models.config import ModelConfig
from memcom_torchrec.modules.dense_tables import dense_tables
from memcom_torchrec.modules.methods import get_method, method_names
from memcom_torchrec.train.config import TrainConfig
from dist_utils import run_multiprocess

NUM_USERS, NUM_ITEMS, DIM = 40, 97, 8
SHAPES = [("next_item", "tied", False), ("next_item", "linear", False), ("ranknet", "dot", False),
          ("ranknet", "mlp", False), ("ranknet", "mlp", True)]


def make_model(method: str, model: str, scorer: str, use_user_id: bool, seed: int = 0):
    # lowrank at d = 8: k = 4, 1.85x; mixed_dim below its maximum, so that its head has a row per rank (RW)
    ratio = min(2.0, 0.95 * get_method(method).max_compression_ratio(NUM_ITEMS, DIM))
    cfg = ModelConfig(model=model, method=method, compression_ratio=ratio if method != "uncompressed" else 1.0,
                      embedding_dim=DIM, hidden=[16], use_user_id=use_user_id, scorer=scorer)
    torch.manual_seed(seed)
    train_model, tables = build_model(cfg, NUM_USERS, NUM_ITEMS, torch.device("cpu"), seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in train_model.named_parameters():
            p.copy_((1.0 + 0.5 * torch.randn(p.shape, generator=g)) if "_entity_weights" in name
                    else 0.3 * torch.randn(p.shape, generator=g))
    for t in tables:  # a stored assignment: a random one-to-one map
        if getattr(t, "stores_assignment", False):
            train_model.model.embeddings.set_assignment(t.name, torch.randperm(t.assignment_cells, generator=g)[: t.num_embeddings])
    return train_model.model, cfg


def make_features(batch: int, use_user_id: bool, seed: int = 1) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 5, (batch,), generator=g)
    lengths[0] = 0
    ids = torch.randint(0, NUM_ITEMS, (int(lengths.sum()),), generator=g)
    if not use_user_id:
        return KeyedJaggedTensor.from_lengths_sync(keys=["history"], values=ids, lengths=lengths)
    users = torch.randint(0, NUM_USERS, (batch,), generator=g)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["user_id", "history"], values=torch.cat([users, ids]), lengths=torch.cat([torch.ones_like(users), lengths])
    )


def item_vectors(t: Dict[str, torch.Tensor], n: int) -> torch.Tensor:
    """Every entity's vector from a table's tensors by role (the methods' definitions)."""
    i = torch.arange(n)
    if "rows" in t:  # the MEmCom-family variants: sum_j w[i, j] U[rows[i, j]]
        return (t["w"][i].unsqueeze(2) * t["U"][t["rows"][i]]).sum(1)
    if "A" in t:  # a low-rank table: P A[i], P of shape d x k
        return t["A"][i] @ t["P"].t()
    if "slots" in t:  # mixed-dimension: head[s] if s = slots[i] < h, else P tail[s - h]
        s, h = t["slots"][i].long(), t["head"].shape[0]
        tail = t["tail"][(s - h).clamp(min=0)] @ t["P"].t()
        return torch.where((s < h).unsqueeze(1), t["head"][s.clamp(max=h - 1)], tail)
    if "weight" in t:
        e = t["weight"][i]
    elif "U" in t:
        e = t["U"][i % t["U"].shape[0]]
    else:
        p = t["R"].shape[0]
        e = t["Q"][i // p] * t["R"][i % p]
    return e * t["w"][i].unsqueeze(1) if "w" in t else e


def reference_scores(model: nn.Module, features: KeyedJaggedTensor) -> torch.Tensor:
    """``B x n`` scores of ``model`` recomputed from its tensors with plain PyTorch."""
    items = item_vectors(dense_tables(model.embeddings, "item"), NUM_ITEMS)
    d = features.to_dict()
    hist = d["history"]
    rows = torch.repeat_interleave(torch.arange(hist.lengths().numel()), hist.lengths())
    pooled = torch.zeros(hist.lengths().numel(), DIM).index_add(0, rows, items[hist.values()])
    pooled = pooled / hist.lengths().clamp(min=1).unsqueeze(1)
    if "user_id" in d:
        users = item_vectors(dense_tables(model.embeddings, "user"), NUM_USERS)
        pooled = torch.cat([pooled, users[d["user_id"].values()]], dim=1)
    if model.scorer == "linear":
        return model.output(model.mlp(pooled))
    if model.scorer == "tied":
        return model.head(model.mlp(pooled)) @ items.t() + model.item_bias
    q = model.query(pooled)
    if model.scorer == "dot":
        return q @ items.t()
    ps = model.pair_scorer
    first = torch.cat([ps.query_proj.weight, ps.item_proj.weight], dim=1)  # Linear(2d, d) over [q, e]
    pairs = torch.cat([q.unsqueeze(1).expand(-1, NUM_ITEMS, -1), items.unsqueeze(0).expand(q.shape[0], -1, -1)], dim=2)
    return ps.out(torch.relu(pairs @ first.t() + ps.query_proj.bias)).squeeze(-1)


def catalogue_scores(model: nn.Module, features: KeyedJaggedTensor) -> torch.Tensor:
    return model(features) if hasattr(model, "head") or hasattr(model, "output") else model.score_all(features)


@pytest.mark.parametrize("method", method_names())
@pytest.mark.parametrize("model_kind,scorer,use_user_id", SHAPES)
def test_scores_and_gradients_match_reference(method, model_kind, scorer, use_user_id):
    model, _ = make_model(method, model_kind, scorer, use_user_id)
    model.train()
    features = make_features(6, use_user_id)
    got = catalogue_scores(model, features)
    want = reference_scores(model, features)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # gradients of every parameter (tables included) through both computations
    weights = torch.randn(got.shape, generator=torch.Generator().manual_seed(3))
    params = [p for p in model.parameters() if p.requires_grad]
    g_got = torch.autograd.grad((got * weights).sum(), params, allow_unused=True)
    g_want = torch.autograd.grad((reference_scores(model, features) * weights).sum(), params, allow_unused=True)
    for (name, _), a, b in zip([(n, p) for n, p in model.named_parameters() if p.requires_grad], g_got, g_want):
        if b is None:
            assert a is None or not a.any(), name
            continue
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_phone_shaped_models_have_no_user_table():
    for kind, scorer in (("next_item", "tied"), ("ranknet", "mlp")):
        model, _ = make_model("memcom", kind, scorer, use_user_id=False)
        assert [t.name for t in model.embeddings.embedding_bag_configs()] == ["item"]
        assert model.features == ["history"]
    tied, _ = make_model("memcom", "next_item", "tied", use_user_id=False)
    assert not hasattr(tied, "output")  # no n x hidden output layer: the item table scores
    linear, _ = make_model("memcom", "next_item", "linear", use_user_id=False)
    assert linear.output.weight.shape == (NUM_ITEMS, 16)


def test_bad_scorer_and_shape_are_named():
    with pytest.raises(ValueError, match="unknown scorer 'mlp' for model 'next_item'; choose one of"):
        ModelConfig(model="next_item", scorer="mlp")
    with pytest.raises(ValueError, match="compressed_tables names 'user' but use_user_id is False"):
        ModelConfig(compressed_tables=["item", "user"], use_user_id=False)
    assert ModelConfig(model="ranknet").scorer == "dot" and ModelConfig().scorer == "linear"


def test_eval_cache_matches_and_is_dropped_in_training():
    model, _ = make_model("memcom", "next_item", "tied", use_user_id=False)
    features = make_features(5, False)
    model.eval()
    with torch.no_grad():
        first = model(features)
        assert model._item_vectors is not None
        torch.testing.assert_close(model(features), first)
    model.train()
    assert model._item_vectors is None


# ------------------------------------------------------------ sharded (2 gloo ranks)
def _sharded_body(rank: int, world_size: int, method: str, model_kind: str, scorer: str, sharding_type: str,
                  state: Dict[str, torch.Tensor]) -> None:
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    from memcom_torchrec.distributed.state_dict_utils import gather_unsharded_state_dict, load_unsharded_state_dict
    from memcom_torchrec.models.builder import embedding_tables
    from memcom_torchrec.train.trainer import shard_model

    lr = 0.1
    cfg = TrainConfig(**vars(make_model(method, model_kind, scorer, False)[1]), sharding_type=sharding_type,
                      embedding_optimizer="sgd", embedding_lr=lr)
    tables = embedding_tables(cfg, NUM_USERS, NUM_ITEMS)
    meta_model, _ = build_model(cfg, NUM_USERS, NUM_ITEMS, torch.device("meta"), seed=0)
    dmp = shard_model(cfg, meta_model, tables, world_size, torch.device("cpu"))
    load_unsharded_state_dict(dmp, state)
    reference, _ = make_model(method, model_kind, scorer, False)
    batches = [make_features(8, False, seed=7 + r) for r in range(world_size)]  # each rank its own batch
    features = batches[rank]
    dmp.eval()
    reference.eval()
    with torch.no_grad():
        inner = dmp.module.model
        got = catalogue_scores(inner, features)
        want = catalogue_scores(reference, features)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # training mode: the catalogue lookup runs through the sharded collection's all-to-alls with autograd.
    # One backward of every rank's own loss, against the unsharded model's backward: the dense layers
    # (called directly here, not through DMP's DDP wrapper, so their gradients are this rank's own) and
    # the fused SGD update of every table, whose gradient comes from every rank's loss (averaged over
    # ranks, as TorchRec does).
    dmp.train()
    reference.train()
    scores = catalogue_scores(dmp.module.model, features)
    scores.sum().backward()
    torch.testing.assert_close(scores.detach(), want, atol=1e-5, rtol=1e-5)
    catalogue_scores(reference, features).sum().backward()
    own = {n: p.grad.clone() for n, p in reference.named_parameters() if p.grad is not None}
    reference.zero_grad()
    (sum(catalogue_scores(reference, b).sum() for b in batches) / world_size).backward()
    dense = dict(in_backward_optimizer_filter(dmp.module.model.named_parameters()))
    assert dense and all(p.grad is not None for p in dense.values()), sorted(dense)
    for name, p in dense.items():
        torch.testing.assert_close(p.grad, own[name], atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    got_state = gather_unsharded_state_dict(dmp.module.model, dst=None)
    moved = 0
    for name, p in reference.named_parameters():
        if name in dense:
            continue
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        moved += int(bool(grad.abs().sum() > 0))
        torch.testing.assert_close(got_state[name], p.detach() - lr * grad, atol=1e-5, rtol=1e-5,
                                   msg=lambda m: f"{name} after one SGD step: {m}")
    assert moved > 0, "no table received a gradient"


@pytest.mark.slow
@pytest.mark.parametrize("sharding_type", ["table_wise", "row_wise"])
@pytest.mark.parametrize("method,model_kind,scorer", [("memcom", "next_item", "tied"), ("qr", "ranknet", "mlp"),
                                                      ("memcom_qr", "ranknet", "dot"), ("lowrank", "next_item", "tied"),
                                                      ("mixed_dim", "next_item", "tied")])
def test_sharded_scores_match_unsharded(method, model_kind, scorer, sharding_type):
    reference, _ = make_model(method, model_kind, scorer, False)
    state = {k: v.detach().clone() for k, v in reference.state_dict().items()}
    state = {"model." + k: v for k, v in state.items()}
    run_multiprocess(_sharded_body, world_size=2, method=method, model_kind=model_kind, scorer=scorer,
                     sharding_type=sharding_type, state=state)
