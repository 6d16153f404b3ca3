"""MEmComEmbeddingBagCollection against a plain-PyTorch reference (forward and gradients)."""

import pytest
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

from memcom_torchrec import (
    MEmComEmbeddingBagCollection,
    MEmComEmbeddingBagConfig,
    compression_ratio,
    num_buckets_for_ratio,
    table_memory,
)
from memcom_torchrec.modules.memcom_embedding_modules import (
    entity_weights_to_dense,
)
from reference import make_kjt_inputs, reference_pool

N_ITEM, N_USER, N_CAT = 53, 10, 20


def tables(mean_cat: bool = True, train_w: bool = True):
    return [
        MEmComEmbeddingBagConfig(
            name="item", num_embeddings=N_ITEM, embedding_dim=8, feature_names=["hist", "target"],
            num_buckets=7, train_entity_weights=train_w,
        ),
        EmbeddingBagConfig(name="user", num_embeddings=N_USER, embedding_dim=4, feature_names=["user"]),
        MEmComEmbeddingBagConfig(
            name="cat", num_embeddings=N_CAT, embedding_dim=4, feature_names=["cat"], num_buckets=3,
            pooling=PoolingType.MEAN if mean_cat else PoolingType.SUM,
        ),
    ]


KEYS = ["hist", "target", "user", "cat"]
SIZES = {"hist": N_ITEM, "target": N_ITEM, "user": N_USER, "cat": N_CAT}


def build(seed: int = 0, **kw) -> MEmComEmbeddingBagCollection:
    torch.manual_seed(seed)
    ebc = MEmComEmbeddingBagCollection(tables(**kw), is_weighted=kw.pop("is_weighted", False) if False else False)
    with torch.no_grad():
        for p in ebc._entity_weights.values():
            p.uniform_(0.5, 1.5)
    return ebc


def reference_outputs(ebc, values, lengths, batch, weights=None):
    """Leaf tensors (U, dense w per table) and the reference pooled output per key."""
    leaves = {}
    for t in ebc.embedding_bag_configs():
        U = ebc._embedding_bag_collection.embedding_bags[t.name].weight.detach().clone().requires_grad_()
        w = None
        if t.name in ebc._entity_weights:
            w = entity_weights_to_dense(ebc._entity_weights[t.name].detach(), t.num_embeddings).clone()
            w.requires_grad_()
        leaves[t.name] = (U, w, t)
    table_of = {f: t.name for t in ebc.embedding_bag_configs() for f in t.feature_names}
    outs = {}
    start = 0
    per_key_lengths = lengths.view(len(KEYS), batch)
    for k, key in enumerate(KEYS):
        ln = per_key_lengths[k]
        n = int(ln.sum())
        U, w, t = leaves[table_of[key]]
        memcom = isinstance(t, MEmComEmbeddingBagConfig)
        outs[key] = reference_pool(
            U, w, values[start : start + n], ln, mean=t.pooling == PoolingType.MEAN,
            input_weights=None if weights is None else weights[start : start + n], hashed=memcom,
        )
        start += n
    return leaves, outs


@pytest.mark.parametrize("batch", [5, 1, 0])
@pytest.mark.parametrize("train_w", [True, False])
def test_forward_and_gradients_match_reference(batch: int, train_w: bool) -> None:
    g = torch.Generator().manual_seed(batch)
    ebc = build(train_w=train_w)
    values, lengths = make_kjt_inputs(KEYS, SIZES, batch, 4, g)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=KEYS, values=values, lengths=lengths)
    kt = ebc(kjt)
    leaves, ref = reference_outputs(ebc, values, lengths, batch)
    got = kt.to_dict()
    assert kt.keys() == ["hist", "target", "user", "cat"]
    torch.testing.assert_close(got["hist"], ref["hist"], atol=1e-5, rtol=1e-5)
    for key in KEYS:
        torch.testing.assert_close(got[key], ref[key], atol=1e-5, rtol=1e-5)

    proj = torch.randn(kt.values().shape, generator=g)
    (kt.values() * proj).sum().backward()
    ref_loss = sum((ref[k] * proj[:, sl]).sum() for k, sl in zip(KEYS, _slices(kt)))
    if batch:
        ref_loss.backward()
    for name, (U, w, t) in leaves.items():
        got_U = ebc._embedding_bag_collection.embedding_bags[name].weight.grad
        expect_U = U.grad if U.grad is not None else torch.zeros_like(U)
        torch.testing.assert_close(got_U if got_U is not None else torch.zeros_like(U), expect_U, atol=1e-5, rtol=1e-5)
        if w is not None:
            got_w = ebc._entity_weights[name].grad
            got_w = torch.zeros(t.num_embeddings) if got_w is None else entity_weights_to_dense(got_w, t.num_embeddings)
            expect_w = w.grad if w.grad is not None else torch.zeros_like(w)
            torch.testing.assert_close(got_w, expect_w, atol=1e-5, rtol=1e-5)
        else:
            assert name not in ebc._entity_weights


def _slices(kt):
    out, start = [], 0
    for d in kt.length_per_key():
        out.append(slice(start, start + d))
        start += d
    return out


def test_weighted_input_kjt_multiplies_w() -> None:
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    ebc = MEmComEmbeddingBagCollection(tables(), is_weighted=True)
    with torch.no_grad():
        for p in ebc._entity_weights.values():
            p.uniform_(0.5, 1.5)
    values, lengths = make_kjt_inputs(KEYS, SIZES, 6, 3, g)
    weights = torch.rand(values.shape, generator=g)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=KEYS, values=values, lengths=lengths, weights=weights)
    got = ebc(kjt).to_dict()
    _, ref = reference_outputs(ebc, values, lengths, 6, weights=weights)
    for key in KEYS:
        torch.testing.assert_close(got[key], ref[key], atol=1e-5, rtol=1e-5)


def test_memcom_parameters_are_dense_views() -> None:
    ebc = build()
    U, w = ebc.memcom_parameters("item")
    assert U.shape == (7, 8) and w.shape == (N_ITEM,)
    grid = ebc._entity_weights["item"]
    for i in [0, 6, 7, 52]:
        assert w[i] == grid[i % 7, i // 7]
    with pytest.raises(KeyError, match="'user' is not a MEmCom table"):
        ebc.memcom_parameters("user")


def test_meta_device_and_reset_parameters() -> None:
    ebc = MEmComEmbeddingBagCollection(tables(), device=torch.device("meta"))
    assert ebc._entity_weights["item"].device.type == "meta"
    ebc = build()
    ebc.reset_parameters()
    assert bool((ebc._entity_weights["item"] == 1.0).all())
    assert [t.name for t in ebc.embedding_bag_configs()] == ["item", "user", "cat"]


# ----------------------------------------------------------------- configs
def test_config_validation() -> None:
    with pytest.raises(ValueError, match="num_buckets must be in"):
        MEmComEmbeddingBagConfig(name="t", num_embeddings=10, embedding_dim=8, feature_names=["f"], num_buckets=11)
    with pytest.raises(ValueError, match="multiple of 4"):
        MEmComEmbeddingBagConfig(name="t", num_embeddings=10, embedding_dim=6, feature_names=["f"], num_buckets=2)
    with pytest.raises(ValueError, match="feature_names is empty"):
        MEmComEmbeddingBagConfig(name="t", num_embeddings=10, embedding_dim=8, num_buckets=2)
    with pytest.raises(ValueError, match="give num_buckets or compression_ratio"):
        MEmComEmbeddingBagConfig(name="t", num_embeddings=10, embedding_dim=8, feature_names=["f"])
    with pytest.raises(ValueError, match="unreachable"):
        MEmComEmbeddingBagConfig(name="t", num_embeddings=1000, embedding_dim=8, feature_names=["f"], compression_ratio=8)
    with pytest.raises(ValueError, match="not both"):
        MEmComEmbeddingBagConfig(
            name="t", num_embeddings=10, embedding_dim=8, feature_names=["f"], num_buckets=2, compression_ratio=2
        )


@pytest.mark.parametrize("n,d,ratio", [(6040, 64, 4.0), (3706, 64, 16.0), (2_000_000, 64, 40.0), (100, 8, 2.0)])
def test_ratio_to_buckets_is_exact(n: int, d: int, ratio: float) -> None:
    m = num_buckets_for_ratio(n, d, ratio)
    assert compression_ratio(n, d, m) >= ratio
    if m < n:
        assert compression_ratio(n, d, m + 1) < ratio  # the largest m reaching the target
    cfg = MEmComEmbeddingBagConfig(name="t", num_embeddings=n, embedding_dim=d, feature_names=["f"], compression_ratio=ratio)
    mem = table_memory(cfg)
    assert mem.num_parameters == m * d + n
    assert mem.compression_ratio == pytest.approx(n * d / (m * d + n))
    assert mem.uncompressed_param_bytes == n * d * 4
    assert mem.param_bytes == 4 * (m * d + m * -(-n // m))


# --------------------------------------------------------------- bad input
def _kjt(keys, values, lengths, **kw):
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=torch.tensor(lengths), **kw)


def good_values():
    return torch.tensor([1, 2, 3, 4, 5])


@pytest.mark.parametrize(
    "values,pattern",
    [
        (torch.tensor([1, 53, 3, 4, 5]), r"feature 'hist': id 53 is out of range for table 'item' \(num_embeddings=53\)"),
        (torch.tensor([1, 2, -4, 4, 5]), r"feature 'target': negative id -4 for table 'item'"),
        (torch.tensor([1, 2, 3, 4, 20]), r"feature 'cat': id 20 is out of range for table 'cat' \(num_embeddings=20\)"),
        (torch.tensor([1, 2, 3, 10, 5]), r"feature 'user': id 10 is out of range for table 'user'"),
        (torch.tensor([1.0, 2, 3, 4, 5]), r"ids must be int32 or int64, got torch.float32"),
    ],
)
def test_bad_ids_raise_clear_errors(values: torch.Tensor, pattern: str) -> None:
    ebc = build()
    kjt = _kjt(["hist", "target", "user", "cat"], values, [2, 1, 1, 1])
    with pytest.raises(ValueError, match=pattern):
        ebc(kjt)


def test_unknown_and_missing_keys() -> None:
    ebc = build()
    with pytest.raises(ValueError, match=r"unknown feature key\(s\) \['oops'\]"):
        ebc(_kjt(["hist", "target", "user", "cat", "oops"], torch.tensor([1, 2, 3, 4, 5]), [1, 1, 1, 1, 1]))
    with pytest.raises(ValueError, match=r"missing feature key\(s\) \['cat'\]"):
        ebc(_kjt(["hist", "target", "user"], torch.tensor([1, 2, 3]), [1, 1, 1]))
    with pytest.raises(ValueError, match="no weights"):
        MEmComEmbeddingBagCollection(tables(), is_weighted=True)(
            _kjt(KEYS, good_values(), [2, 1, 1, 1])
        )
