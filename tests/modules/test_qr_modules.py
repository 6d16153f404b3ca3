"""QREmbeddingBagCollection (quotient-remainder baseline) against plain-PyTorch references.

Unsharded forward/gradients, the ratio -> num_collisions rule, input errors and
memory accounting. The sharded twin (2-process gloo DMP runs) is tested in
tests/distributed/test_sharded_qr.py.
"""

import math
from typing import Dict, List, Optional, Tuple

import pytest
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

from memcom_torchrec.modules.memory import table_memory
from memcom_torchrec.modules.qr_configs import (
    QREmbeddingBagConfig,
    max_qr_compression_ratio,
    num_collisions_for_ratio,
    qr_num_rows,
)
from memcom_torchrec.modules.qr_embedding_modules import QREmbeddingBagCollection
from memcom_torchrec.modules.storage import table_storage
from reference import make_kjt_inputs

N_ITEM, N_USER, N_CAT = 53, 10, 20
KEYS = ["hist", "target", "user", "cat"]
SIZES = {"hist": N_ITEM, "target": N_ITEM, "user": N_USER, "cat": N_CAT}


def tables(mean_cat: bool = True, cat_dim: int = 4, entity_weights: bool = False) -> List[EmbeddingBagConfig]:
    return [
        QREmbeddingBagConfig(
            name="item", num_embeddings=N_ITEM, embedding_dim=8, feature_names=["hist", "target"], num_collisions=7,
            entity_weights=entity_weights,
        ),
        EmbeddingBagConfig(name="user", num_embeddings=N_USER, embedding_dim=cat_dim, feature_names=["user"]),
        QREmbeddingBagConfig(
            name="cat", num_embeddings=N_CAT, embedding_dim=cat_dim, feature_names=["cat"], num_collisions=3,
            pooling=PoolingType.MEAN if mean_cat else PoolingType.SUM,
        ),
    ]


def build(seed: int = 0, is_weighted: bool = False, **kw) -> QREmbeddingBagCollection:
    torch.manual_seed(seed)
    ebc = QREmbeddingBagCollection(tables(**kw), is_weighted=is_weighted)
    with torch.no_grad():  # R and w start at 1.0: randomise them so that a mix-up shows
        for t in ebc.embedding_bag_configs():
            if isinstance(t, QREmbeddingBagConfig):
                ebc.qr_parameters(t.name)[1].uniform_(0.5, 1.5)
                if t.entity_weights:
                    ebc.entity_weights(t.name).uniform_(0.5, 1.5)
    return ebc


def reference_qr_pool(
    Q: Optional[torch.Tensor],
    R: Optional[torch.Tensor],
    E: Optional[torch.Tensor],
    p: int,
    ids: torch.Tensor,
    lengths: torch.Tensor,
    mean: bool,
    input_weights: Optional[torch.Tensor] = None,
    w: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``out[b] = sum_j c_j (w[i_j]) Q[i_j // p] * R[i_j % p]`` (or ``E[i_j]`` for a plain table), bag by bag."""
    dim = (Q if Q is not None else E).shape[1]
    rows, start = [], 0
    for length in lengths.tolist():
        acc = torch.zeros(dim)
        for j in range(start, start + length):
            i = int(ids[j])
            term = Q[i // p] * R[i % p] if Q is not None else E[i]
            if w is not None:
                term = w[i] * term
            if input_weights is not None:
                term = input_weights[j] * term
            acc = acc + term
        if mean and length > 0:
            acc = acc / length
        rows.append(acc)
        start += length
    return torch.stack(rows) if rows else torch.zeros(0, dim)


def reference_outputs(ebc: QREmbeddingBagCollection, values, lengths, batch, weights=None):
    """Leaf copies of every table and the reference pooled output per key."""
    leaves: Dict[str, Tuple] = {}
    for t in ebc.embedding_bag_configs():
        if isinstance(t, QREmbeddingBagConfig):
            Q, R = (x.detach().clone().requires_grad_() for x in ebc.qr_parameters(t.name))
            w = ebc.entity_weights(t.name).detach().clone().requires_grad_() if t.entity_weights else None
            leaves[t.name] = (Q, R, w, None, t)
        else:
            child = getattr(ebc, ebc.feature_specs()[t.feature_names[0]].group)
            E = child.embeddings[t.name].weight.detach().clone().requires_grad_()
            leaves[t.name] = (None, None, None, E, t)
    table_of = {f: t.name for t in ebc.embedding_bag_configs() for f in t.feature_names}
    outs, start = {}, 0
    per_key = lengths.view(len(KEYS), batch)
    for k, key in enumerate(KEYS):
        ln = per_key[k]
        n = int(ln.sum())
        Q, R, w, E, t = leaves[table_of[key]]
        outs[key] = reference_qr_pool(
            Q, R, E, getattr(t, "num_collisions", 0), values[start : start + n], ln,
            mean=t.pooling == PoolingType.MEAN,
            input_weights=None if weights is None else weights[start : start + n],
            w=w,
        )
        start += n
    return leaves, outs


def module_grads(ebc: QREmbeddingBagCollection) -> Dict[str, Tuple[torch.Tensor, ...]]:
    grads = {}
    for t in ebc.embedding_bag_configs():
        if isinstance(t, QREmbeddingBagConfig):
            grads[t.name] = tuple(x.grad for x in ebc.qr_parameters(t.name))
            if t.entity_weights:
                grads[t.name] += (ebc.entity_weights(t.name).grad,)
        else:
            child = getattr(ebc, ebc.feature_specs()[t.feature_names[0]].group)
            grads[t.name] = (child.embeddings[t.name].weight.grad,)
    return grads


def check_against_reference(ebc, kjt, values, lengths, batch, weights=None) -> None:
    kt = ebc(kjt)
    assert kt.keys() == KEYS
    leaves, ref = reference_outputs(ebc, values, lengths, batch, weights)
    out = kt.to_dict()
    for key in KEYS:
        torch.testing.assert_close(out[key], ref[key], atol=1e-5, rtol=1e-5, msg=lambda m: f"{key}: {m}")
    proj = torch.randn(kt.values().shape, generator=torch.Generator().manual_seed(7))
    (kt.values() * proj).sum().backward()
    ref_values = torch.cat([ref[k] for k in KEYS], dim=1)
    if ref_values.requires_grad:  # an empty batch looks nothing up
        (ref_values * proj).sum().backward()
    got = module_grads(ebc)
    for name, (Q, R, w, E, _) in leaves.items():
        expected = (Q.grad, R.grad) + ((w.grad,) if w is not None else ()) if Q is not None else (E.grad,)
        whats = ("Q", "R", "w") if Q is not None else ("E",)
        assert len(got[name]) == len(expected)
        for g, e, what in zip(got[name], expected, whats):
            if e is None:  # table not looked up (empty batch)
                assert g is None or torch.count_nonzero(g) == 0
                continue
            torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5, msg=lambda m: f"grad {name}.{what}: {m}")


# ---------------------------------------------------------------------------
# Forward and gradients
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [5, 1, 0])
@pytest.mark.parametrize("mean_cat", [True, False])
@pytest.mark.parametrize("entity_weights", [False, True])
def test_forward_and_gradients_match_reference(batch: int, mean_cat: bool, entity_weights: bool) -> None:
    g = torch.Generator().manual_seed(batch + 10 * mean_cat)
    values, lengths = make_kjt_inputs(KEYS, SIZES, batch, 6, g)
    if batch:
        lengths[0] = 0  # an empty bag for sure
        values, lengths = _rebuild(values, lengths, batch, g)
    ebc = build(mean_cat=mean_cat, entity_weights=entity_weights)
    kjt = KeyedJaggedTensor(keys=KEYS, values=values, lengths=lengths, stride=batch)
    check_against_reference(ebc, kjt, values, lengths, batch)


def _rebuild(values, lengths, batch, g):
    """Fresh ids for edited lengths (keeps every id inside its key's range)."""
    out, per_key = [], lengths.view(len(KEYS), batch)
    for k, key in enumerate(KEYS):
        out.append(torch.randint(0, SIZES[key], (int(per_key[k].sum()),), generator=g))
    return torch.cat(out), lengths


def test_all_bags_empty_gives_zeros() -> None:
    ebc = build()
    lengths = torch.zeros(len(KEYS) * 3, dtype=torch.long)
    kjt = KeyedJaggedTensor(keys=KEYS, values=torch.zeros(0, dtype=torch.long), lengths=lengths, stride=3)
    kt = ebc(kjt)
    assert kt.values().shape == (3, 8 + 8 + 4 + 4)
    assert torch.count_nonzero(kt.values()) == 0


@pytest.mark.parametrize("entity_weights", [False, True])
def test_weighted_input_matches_reference(entity_weights: bool) -> None:
    g = torch.Generator().manual_seed(3)
    batch = 4
    values, lengths = make_kjt_inputs(KEYS, SIZES, batch, 5, g)
    weights = torch.rand(values.numel(), generator=g) * 2 - 0.5
    ebc = build(is_weighted=True, entity_weights=entity_weights)
    kjt = KeyedJaggedTensor(keys=KEYS, values=values, lengths=lengths, weights=weights, stride=batch)
    check_against_reference(ebc, kjt, values, lengths, batch, weights)


def test_key_order_of_input_does_not_matter() -> None:
    g = torch.Generator().manual_seed(4)
    values, lengths = make_kjt_inputs(KEYS, SIZES, 3, 4, g)
    ebc = build()
    kjt = KeyedJaggedTensor(keys=KEYS, values=values, lengths=lengths, stride=3)
    expected = ebc(kjt).to_dict()
    d = kjt.to_dict()
    rev = list(reversed(KEYS))
    permuted = KeyedJaggedTensor(
        keys=rev, values=torch.cat([d[k].values() for k in rev]), lengths=torch.cat([d[k].lengths() for k in rev]),
        stride=3,
    )
    kt = ebc(permuted)
    assert kt.keys() == KEYS
    for k in KEYS:
        torch.testing.assert_close(kt.to_dict()[k], expected[k])


def test_entity_embeddings_are_distinct_products() -> None:
    """Every entity i gets Q[i // p] * R[i % p]: a one-id bag returns exactly that row."""
    ebc = build(mean_cat=False)
    Q, R = ebc.qr_parameters("item")
    n = N_ITEM
    ids = torch.arange(n)
    lengths = torch.cat([torch.ones(n), torch.zeros(n), torch.zeros(n), torch.zeros(n)]).long()
    kjt = KeyedJaggedTensor(keys=KEYS, values=ids, lengths=lengths, stride=n)
    hist = ebc(kjt).to_dict()["hist"]
    torch.testing.assert_close(hist, Q[ids // 7] * R[ids % 7])
    assert torch.unique(hist.detach(), dim=0).shape[0] == n


def test_entity_weights_scale_each_entity_and_live_in_a_flat_parameter() -> None:
    """memcom_qr: entity i is w[i] * Q[i // p] * R[i % p]; w is one scalar per entity, init 1, named as MEmCom's."""
    torch.manual_seed(0)
    fresh = QREmbeddingBagCollection(tables(entity_weights=True, cat_dim=8))
    flat = fresh.state_dict()["_entity_weights.item"]
    assert tuple(flat.shape) == (N_ITEM,) and torch.all(flat == 1.0)
    assert {k for k in fresh.state_dict() if "item" in k} == {
        "_embedding_collection.embeddings.item__q.weight", "_embedding_collection.embeddings.item__r.weight",
        "_entity_weights.item",
    }
    assert "_entity_weights.cat" not in fresh.state_dict()
    ebc = build(mean_cat=False, entity_weights=True)
    Q, R = ebc.qr_parameters("item")
    w = ebc.entity_weights("item")
    n = N_ITEM
    ids = torch.arange(n)
    lengths = torch.cat([torch.ones(n), torch.zeros(n), torch.zeros(n), torch.zeros(n)]).long()
    hist = ebc(KeyedJaggedTensor(keys=KEYS, values=ids, lengths=lengths, stride=n)).to_dict()["hist"]
    torch.testing.assert_close(hist, w[ids].unsqueeze(1) * Q[ids // 7] * R[ids % 7])
    assert w is ebc._entity_weights["item"]  # the parameter itself, not a copy
    with torch.no_grad():  # spoil all three, then reset: w back to 1, R to 1, Q re-drawn
        w.fill_(3.0)
        R.fill_(3.0)
        Q.fill_(3.0)
    ebc.reset_parameters()
    assert torch.all(w == 1.0)
    assert torch.all(R == 1.0)
    assert Q.abs().max() <= math.sqrt(1 / N_ITEM) and torch.unique(Q).numel() == Q.numel()
    with pytest.raises(KeyError, match="not a QR table with entity_weights"):
        build().entity_weights("item")


def test_parameter_names_shapes_and_init() -> None:
    torch.manual_seed(0)
    ebc = QREmbeddingBagCollection(tables(cat_dim=8))
    shapes = {k: tuple(v.shape) for k, v in ebc.state_dict().items()}
    assert shapes == {
        "_embedding_collection.embeddings.item__q.weight": (math.ceil(N_ITEM / 7), 8),
        "_embedding_collection.embeddings.item__r.weight": (7, 8),
        "_embedding_collection.embeddings.user.weight": (N_USER, 8),
        "_embedding_collection.embeddings.cat__q.weight": (math.ceil(N_CAT / 3), 8),
        "_embedding_collection.embeddings.cat__r.weight": (3, 8),
    }
    Q, R = ebc.qr_parameters("item")
    assert torch.all(R == 1.0)
    bound = math.sqrt(1 / N_ITEM)
    assert Q.abs().max() <= bound and Q.abs().max() > 0
    with torch.no_grad():
        Q.zero_()
        R.zero_()
    ebc.reset_parameters()
    assert torch.all(R == 1.0) and Q.abs().max() > 0
    with pytest.raises(KeyError, match="not a QR table"):
        ebc.qr_parameters("user")


def test_plain_feature_with_suffix_like_name() -> None:
    ebc = QREmbeddingBagCollection([
        QREmbeddingBagConfig(name="a", num_embeddings=10, embedding_dim=4, feature_names=["x"], num_collisions=2),
        EmbeddingBagConfig(name="b", num_embeddings=10, embedding_dim=4, feature_names=["y__q"]),
    ])
    kjt = KeyedJaggedTensor(keys=["x", "y__q"], values=torch.tensor([3, 9]), lengths=torch.tensor([1, 1]), stride=1)
    out = ebc(kjt).to_dict()
    Q, R = ebc.qr_parameters("a")
    torch.testing.assert_close(out["x"][0], Q[1] * R[1])
    torch.testing.assert_close(out["y__q"][0], ebc._embedding_collection.embeddings["b"].weight[9])


def test_mixed_dims_get_one_child_per_dim() -> None:
    ebc = build()
    names = {k.split(".")[0] for k in ebc.state_dict()}
    assert names == {"_embedding_collection", "_embedding_collection_d4"}


def test_meta_device_construction() -> None:
    ebc = QREmbeddingBagCollection(tables(), device=torch.device("meta"))
    assert all(p.device.type == "meta" for p in ebc.parameters())
    ebc.reset_parameters()  # a no-op on meta
    assert ebc.is_weighted() is False
    assert [t.name for t in ebc.embedding_bag_configs()] == ["item", "user", "cat"]


# ---------------------------------------------------------------------------
# Config: ratio -> num_collisions rule
# ---------------------------------------------------------------------------
def _brute_force_p(n: int, ratio: float) -> Optional[int]:
    for p in range(1, n + 1):
        if n / (math.ceil(n / p) + p) >= ratio:
            return p
    return None


@pytest.mark.parametrize("n", [1, 2, 3, 10, 53, 100, 997, 1000, 4096, 12345])
def test_num_collisions_for_ratio_is_smallest_p_reaching_ratio(n: int) -> None:
    best_p, best = max_qr_compression_ratio(n)
    assert best == max(n / (math.ceil(n / p) + p) for p in range(1, n + 1))
    assert best_p == min(p for p in range(1, n + 1) if n / (math.ceil(n / p) + p) == best)
    for ratio in [1.0, 1.5, 2.0, 3.0, 4.0, 7.5, 8.0, 16.0, 25.0, best, best * 1.0001 + 1e-9]:
        if ratio < 1:
            with pytest.raises(ValueError, match=">= 1"):
                num_collisions_for_ratio(n, ratio)
            continue
        expected = _brute_force_p(n, ratio)
        if expected is None:
            with pytest.raises(ValueError, match="unreachable"):
                num_collisions_for_ratio(n, ratio)
            continue
        p = num_collisions_for_ratio(n, ratio)
        assert p == expected, (n, ratio)
        assert n / qr_num_rows(n, p) >= ratio
        assert qr_num_rows(n, p) == math.ceil(n / p) + p


@pytest.mark.parametrize("n, d", [(53, 8), (1000, 16), (3706, 64)])
def test_ratio_rule_with_entity_weights_counts_n_more_parameters(n: int, d: int) -> None:
    for ratio in [1.5, 2.0, 4.0, 8.0, 16.0, 30.0]:
        fits = [p for p in range(1, n + 1) if n * d / ((math.ceil(n / p) + p) * d + n) >= ratio]
        if not fits:
            with pytest.raises(ValueError, match="unreachable with the quotient-remainder trick with per-entity"):
                num_collisions_for_ratio(n, ratio, d, n)
            continue
        p = num_collisions_for_ratio(n, ratio, d, n)
        assert p == min(fits), (n, d, ratio)
        t = QREmbeddingBagConfig(name="t", num_embeddings=n, embedding_dim=d, feature_names=["f"],
                                 compression_ratio=ratio, entity_weights=True)
        assert t.num_collisions == p
        assert table_storage(t).num_parameters == (math.ceil(n / p) + p) * d + n
        assert table_memory(t).compression_ratio >= ratio
    # ML-1M's item table at 16x: w (3,706 scalars) leaves fewer rows than plain QR gets.
    assert num_collisions_for_ratio(3706, 16.0, 64, 3706) > num_collisions_for_ratio(3706, 16.0)


def test_ratio_rule_examples() -> None:
    # 10^6 entities at 16x: L = 62_500 rows allowed; p = 16 needs 62_500 + 16, p = 17 fits.
    assert num_collisions_for_ratio(1_000_000, 16.0) == 17
    assert max_qr_compression_ratio(1_000_000) == (1000, 500.0)
    t = QREmbeddingBagConfig(name="t", num_embeddings=1_000_000, embedding_dim=64, feature_names=["f"], compression_ratio=16.0)
    assert (t.num_collisions, t.num_quotient_rows, t.num_remainder_rows) == (17, 58_824, 17)
    assert table_memory(t).compression_ratio == pytest.approx(1_000_000 / (58_824 + 17))


def test_unreachable_ratio_error_names_the_maximum() -> None:
    with pytest.raises(ValueError, match=r"QR table 'items'.*unreachable.*at most 500 \(num_collisions=1000"):
        QREmbeddingBagConfig(name="items", num_embeddings=1_000_000, embedding_dim=8, feature_names=["f"], compression_ratio=600)
    with pytest.raises(ValueError, match=">= 1"):
        num_collisions_for_ratio(100, 0.5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(embedding_dim=6, num_collisions=3), "multiple of 4"),
        (dict(feature_names=[], num_collisions=3), "feature_names is empty"),
        (dict(feature_names=["a", "a"], num_collisions=3), "duplicate feature"),
        (dict(num_collisions=0), "give num_collisions or compression_ratio"),
        (dict(num_collisions=3, compression_ratio=2.0), "not both"),
        (dict(num_collisions=101), r"num_collisions must be in \[1, num_embeddings=100\]"),
        (dict(num_embeddings=0, num_collisions=1), "num_embeddings must be > 0"),
        (dict(num_collisions=3, pooling=PoolingType.NONE), "pooling must be SUM or MEAN"),
    ],
)
def test_config_validation(kwargs, match) -> None:
    base = dict(name="t", num_embeddings=100, embedding_dim=8, feature_names=["f"])
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        QREmbeddingBagConfig(**base)


def test_name_clashes_are_rejected() -> None:
    with pytest.raises(ValueError, match="not unique"):
        QREmbeddingBagCollection([
            QREmbeddingBagConfig(name="a", num_embeddings=10, embedding_dim=4, feature_names=["x"], num_collisions=2),
            EmbeddingBagConfig(name="a__q", num_embeddings=10, embedding_dim=4, feature_names=["y"]),
        ])
    with pytest.raises(ValueError, match="collide"):
        QREmbeddingBagCollection([
            QREmbeddingBagConfig(name="a", num_embeddings=10, embedding_dim=4, feature_names=["x"], num_collisions=2),
            EmbeddingBagConfig(name="b", num_embeddings=10, embedding_dim=4, feature_names=["x__r"]),
        ])
    with pytest.raises(ValueError, match="feature 'x' is used by tables 'a' and 'b'"):
        QREmbeddingBagCollection([
            QREmbeddingBagConfig(name="a", num_embeddings=10, embedding_dim=4, feature_names=["x"], num_collisions=2),
            EmbeddingBagConfig(name="b", num_embeddings=10, embedding_dim=4, feature_names=["x"]),
        ])


# ---------------------------------------------------------------------------
# Input errors
# ---------------------------------------------------------------------------
def _kjt(values: List[int], keys=KEYS, lengths=None, weights=None) -> KeyedJaggedTensor:
    lengths = lengths if lengths is not None else [1] * len(keys)
    return KeyedJaggedTensor(
        keys=keys, values=torch.tensor(values), lengths=torch.tensor(lengths), stride=1,
        weights=None if weights is None else torch.tensor(weights),
    )


@pytest.mark.parametrize(
    "values, match",
    [
        ([1, 53, 0, 0], "feature 'target': id 53 is out of range for table 'item' \\(num_embeddings=53\\)"),
        ([1, 2, 0, -1], "feature 'cat': negative id -1 for table 'cat'"),
        ([1, 2, 10, 0], "feature 'user': id 10 is out of range for table 'user' \\(num_embeddings=10\\)"),
    ],
)
def test_bad_ids_name_feature_and_value(values, match) -> None:
    with pytest.raises(ValueError, match=match):
        build()(_kjt(values))


def test_bad_keys_and_weights() -> None:
    ebc = build()
    with pytest.raises(ValueError, match="missing feature key"):
        ebc(_kjt([1, 2, 3], keys=KEYS[:3]))
    with pytest.raises(ValueError, match="unknown feature key"):
        ebc(_kjt([1, 2, 3, 4, 5], keys=KEYS + ["zzz"]))
    with pytest.raises(ValueError, match="is_weighted=False"):
        ebc(_kjt([1, 2, 3, 4], weights=[1.0] * 4))
    with pytest.raises(ValueError, match="is_weighted=True"):
        build(is_weighted=True)(_kjt([1, 2, 3, 4]))
