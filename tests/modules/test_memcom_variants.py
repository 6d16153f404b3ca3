"""The MEmCom-family variants against a plain-PyTorch reference: forward, gradients, layout, assignments, memory."""

import math

import pytest
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

from memcom_torchrec import MEmComEmbeddingBagCollection, MEmComEmbeddingBagConfig, table_memory
from memcom_torchrec.modules.assignment import clustered_assignment, frequency_assignment
from memcom_torchrec.modules.memcom_configs import variant_compression_ratio
from memcom_torchrec.modules.storage import table_storage
from reference import make_kjt_inputs

N, M, D = 101, 10, 8
VARIANTS = {
    "2hash": dict(num_hashes=2),
    "frequency": dict(assignment="frequency", head_fraction=0.3),
    "clustered": dict(assignment="clustered"),
    "clustered_2hash": dict(assignment="clustered", num_hashes=2),
}
KEYS = ["hist", "user", "cat"]
SIZES = {"hist": N, "user": 12, "cat": 30}


def make(variant: str, seed: int = 0, is_weighted: bool = False) -> MEmComEmbeddingBagCollection:
    torch.manual_seed(seed)
    tables = [
        MEmComEmbeddingBagConfig(name="item", num_embeddings=N, embedding_dim=D, feature_names=["hist"],
                                 num_buckets=M, **VARIANTS[variant]),
        EmbeddingBagConfig(name="user", num_embeddings=12, embedding_dim=4, feature_names=["user"]),
        MEmComEmbeddingBagConfig(name="cat", num_embeddings=30, embedding_dim=4, feature_names=["cat"], num_buckets=4,
                                 pooling=PoolingType.MEAN, **VARIANTS[variant]),
    ]
    ebc = MEmComEmbeddingBagCollection(tables, is_weighted=is_weighted)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ebc._entity_weights.values():
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    for t in tables:
        if isinstance(t, MEmComEmbeddingBagConfig) and t.stores_assignment:
            ebc.set_assignment(t.name, torch.randperm(t.assignment_cells, generator=g)[: t.num_embeddings])
    return ebc


def reference_cells(ebc: MEmComEmbeddingBagCollection, t: MEmComEmbeddingBagConfig) -> torch.Tensor:
    """``n x k`` grid cells of every entity, from the definitions (not from the module's hashing)."""
    n, m = t.num_embeddings, t.num_buckets
    i = torch.arange(n)
    first = ebc.assignment(t.name).long() if t.stores_assignment else i
    if t.num_hashes == 1:
        return first.unsqueeze(1)
    a = next(a for a in range(int(0.6180339887 * n), 2 * n) if math.gcd(a, n) == 1)
    second = (a * i) % n
    capacity = -(-n // m)
    # the second hash's cell: row second % m, column C + second // m
    return torch.stack([first, second % m + m * (capacity + second // m)], dim=1)


def reference_forward(ebc, values, lengths, batch, weights=None):
    """Pooled outputs (in key order) from leaf copies of every table: sum over a bag of c * sum_j w_ij U[r_ij]."""
    leaves, outs, start = {}, [], 0
    for t in ebc.embedding_bag_configs():
        U = ebc._embedding_bag_collection.embedding_bags[t.name].weight.detach().clone().requires_grad_()
        grid = ebc._entity_weights[t.name].detach().clone().requires_grad_() if t.name in ebc._entity_weights else None
        leaves[t.name] = (U, grid)
    table_of = {f: t for t in ebc.embedding_bag_configs() for f in t.feature_names}
    for k, key in enumerate(KEYS):
        t = table_of[key]
        U, grid = leaves[t.name]
        rows = []
        for b in range(batch):
            n_ids = int(lengths[k * batch + b])
            acc = torch.zeros(t.embedding_dim)
            for j in range(start, start + n_ids):
                i = int(values[j])
                c = 1.0 if weights is None else weights[j]
                if grid is None:
                    acc = acc + c * U[i]
                else:
                    for cell in reference_cells(ebc, t)[i].tolist():
                        r, col = cell % t.num_buckets, cell // t.num_buckets
                        acc = acc + c * grid[r, col] * U[r]
            if t.pooling == PoolingType.MEAN and n_ids:
                acc = acc / n_ids
            rows.append(acc)
            start += n_ids
        outs.append(torch.stack(rows))
    return torch.cat(outs, dim=1), leaves


@pytest.mark.parametrize("is_weighted", [False, True])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_forward_and_gradients_match_reference(variant: str, is_weighted: bool) -> None:
    ebc = make(variant, is_weighted=is_weighted)
    batch = 5
    g = torch.Generator().manual_seed(7)
    values, lengths = make_kjt_inputs(KEYS, SIZES, batch, 6, g)
    weights = torch.rand(values.numel(), generator=g) + 0.5 if is_weighted else None
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=KEYS, values=values, lengths=lengths, weights=weights)
    out = ebc(kjt)
    assert out.keys() == KEYS
    expected, leaves = reference_forward(ebc, values, lengths, batch, weights)
    torch.testing.assert_close(out.values(), expected, atol=1e-5, rtol=1e-5)
    proj = torch.randn(expected.shape, generator=g)
    (out.values() * proj).sum().backward()
    (expected * proj).sum().backward()
    for name, (U, grid) in leaves.items():
        torch.testing.assert_close(ebc._embedding_bag_collection.embedding_bags[name].weight.grad, U.grad)
        if grid is not None:
            torch.testing.assert_close(ebc._entity_weights[name].grad, grid.grad)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_dense_tables_give_every_entity_its_vector(variant: str) -> None:
    ebc = make(variant)
    t = ebc.embedding_bag_configs()[0]
    tensors = ebc.dense_tables("item")
    assert set(tensors) == {"U", "rows", "w"} and tensors["rows"].shape == (N, t.num_hashes)
    cells = reference_cells(ebc, t)
    torch.testing.assert_close(tensors["rows"], cells % M)
    torch.testing.assert_close(tensors["w"], ebc._entity_weights["item"].detach().reshape(-1)[
        (cells % M) * t.grid_columns + cells // M])


def test_two_hashes_spread_bucket_mates() -> None:
    """Entities sharing their first row rarely share their second: the second hash is not the first."""
    t = MEmComEmbeddingBagConfig(name="item", num_embeddings=3706, embedding_dim=64, feature_names=["h"],
                                 compression_ratio=16, num_hashes=2)
    rows, _ = MEmComEmbeddingBagCollection([t]).entity_cells("item")
    same_first = rows[:, 0].unsqueeze(0) == rows[:, 0].unsqueeze(1)
    same_both = same_first & (rows[:, 1].unsqueeze(0) == rows[:, 1].unsqueeze(1))
    pairs_first = int(same_first.sum()) - 3706
    assert int(same_both.sum()) - 3706 < 0.05 * pairs_first  # a pair shares both rows ~1/m of the time
    # one-to-one cells: (row, column) pairs are distinct per hash
    _, cols = MEmComEmbeddingBagCollection([t]).entity_cells("item")
    for j in range(2):
        assert torch.unique(rows[:, j] * 10_000 + cols[:, j]).numel() == 3706


def test_ratios_count_what_is_stored() -> None:
    """ML-1M's item table at 16x: ``m*d`` + ``k*n`` scalars + the int16 assignment are in the budget (one basis
    for every method); the training memory also counts the grid's padding cells."""
    n, d = 3706, 64
    budget = n * d / 16
    for options, k, m, cols, assignment_bytes in [
        (dict(num_hashes=2), 2, 115, 2 * 33, 0),
        (dict(assignment="clustered"), 1, 144, 26, 2 * n),
        (dict(assignment="frequency", head_fraction=0.25), 1, 144, 34, 2 * n),
        (dict(assignment="clustered", num_hashes=2), 2, 86, 2 * 44, 2 * n),
    ]:
        t = MEmComEmbeddingBagConfig(name="item", num_embeddings=n, embedding_dim=d, feature_names=["h"],
                                     compression_ratio=16, **options)
        assert (t.num_buckets, t.grid_columns) == (m, cols), options
        stored = m * d + k * n + assignment_bytes / 4
        assert stored <= budget < stored + d  # the largest m within the budget
        storage = table_storage(t)
        assert storage.stored_floats == stored and storage.assignment_bytes == assignment_bytes
        assert storage.tensor("w").shape == (n, k) and storage.tensor("w").held_shape == (m, cols)
        mem = table_memory(t)
        assert mem.assignment_bytes == assignment_bytes
        assert mem.param_bytes == m * d * 4 + m * cols * 4 + assignment_bytes
        assert mem.compression_ratio == pytest.approx(n * d / stored) == variant_compression_ratio(
            n, d, m, t.num_hashes, t.assignment, t.head_fraction)
    assert MEmComEmbeddingBagConfig(name="item", num_embeddings=n, embedding_dim=d, feature_names=["h"],
                                    compression_ratio=16, assignment="frequency", head_fraction=0.25).num_head_buckets == 36


def test_bad_variant_configs_are_named() -> None:
    base = dict(name="item", num_embeddings=N, embedding_dim=D, feature_names=["h"])
    with pytest.raises(ValueError, match="table 'item': compression_ratio 8 is unreachable with num_hashes=2"):
        MEmComEmbeddingBagConfig(compression_ratio=8, num_hashes=2, **base)  # 2n scalars alone exceed n*d/8
    with pytest.raises(ValueError, match="num_hashes must be 1, or 2 with assignment 'hash' or 'clustered'; got 3"):
        MEmComEmbeddingBagConfig(num_buckets=M, num_hashes=3, **base)
    with pytest.raises(ValueError, match="num_hashes must be 1, or 2 with assignment 'hash' or 'clustered'; got 2"):
        MEmComEmbeddingBagConfig(num_buckets=M, num_hashes=2, assignment="frequency", head_fraction=0.2, **base)
    with pytest.raises(ValueError, match="unknown assignment 'kmeans'"):
        MEmComEmbeddingBagConfig(num_buckets=M, assignment="kmeans", **base)
    with pytest.raises(ValueError, match="'frequency' needs 0 < head_fraction < 1, got 0.0"):
        MEmComEmbeddingBagConfig(num_buckets=M, assignment="frequency", **base)
    with pytest.raises(ValueError, match="need trained w"):
        MEmComEmbeddingBagConfig(num_buckets=M, num_hashes=2, train_entity_weights=False, **base)


def test_bad_assignments_are_refused_with_the_table_named() -> None:
    ebc = make("clustered")
    cells = ebc.assignment("item").clone()
    for bad, pattern in [
        (cells[:-1], r"table 'item' \(assignment 'clustered'\): the assignment has shape \(100,\), expected \(101,\)"),
        (cells.float(), "must hold integer cells, got torch.float32"),
        (torch.full((N,), 1000), "entity 0 is assigned cell 1000, outside the grid's 110 cells"),
        (torch.zeros(N, dtype=torch.long), "puts two entities in one cell"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            ebc.set_assignment("item", bad)
    assert torch.equal(ebc.assignment("item"), cells)  # nothing half-written
    with pytest.raises(KeyError, match="table 'user' stores no assignment"):
        ebc.set_assignment("user", cells)


def test_frequency_head_rows_hold_one_entity_each() -> None:
    t = MEmComEmbeddingBagConfig(name="item", num_embeddings=N, embedding_dim=D, feature_names=["h"], num_buckets=M,
                                 assignment="frequency", head_fraction=0.3)
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 1000, (N,), generator=g).double()
    cells = frequency_assignment(counts, t)
    rows = cells % M
    head = torch.argsort(-counts, stable=True)[: t.num_head_buckets]
    assert t.num_head_buckets == 3
    assert torch.equal(rows[head], torch.arange(3))  # the most frequent entity in row 0, ...
    assert torch.bincount(rows, minlength=M)[:3].tolist() == [1, 1, 1]  # alone in their rows
    tail = torch.bincount(rows, minlength=M)[3:]
    assert int(tail.max() - tail.min()) <= 1 and int(tail.max()) <= t.hash_columns
    assert torch.unique(cells).numel() == N and int(cells.max()) < t.assignment_cells
    # the tail is dealt most frequent first: the 7 next most frequent land in 7 different rows
    nxt = torch.argsort(-counts, stable=True)[3:10]
    assert torch.unique(rows[nxt]).numel() == 7
    with pytest.raises(ValueError, match="table 'item': 100 counts for 101 entities"):
        frequency_assignment(counts[:-1], t)


def test_clustering_recovers_planted_lines_within_capacity() -> None:
    """Items on m lines through the origin (any sign, any length): each line becomes one row, w * U fits them."""
    m, per = 6, 9
    t = MEmComEmbeddingBagConfig(name="item", num_embeddings=m * per, embedding_dim=D, feature_names=["h"],
                                 num_buckets=m, assignment="clustered")
    assert t.hash_columns == per
    g = torch.Generator().manual_seed(3)
    lines = torch.randn(m, D, generator=g)
    truth = torch.arange(m * per) % m
    scale = (torch.rand(m * per, generator=g) + 0.3) * torch.where(torch.rand(m * per, generator=g) < 0.5, -1.0, 1.0)
    vectors = scale.unsqueeze(1) * lines[truth] + 0.01 * torch.randn(m * per, D, generator=g)
    cells, U, w = clustered_assignment(vectors, t, seed=0)
    rows = cells % m
    assert torch.bincount(rows, minlength=m).tolist() == [per] * m  # balanced: every row at capacity
    for line in range(m):  # one planted line per row
        assert torch.unique(rows[truth == line]).numel() == 1
    torch.testing.assert_close(w.unsqueeze(1) * U[rows], vectors, atol=0.05, rtol=0.0)
    assert torch.unique(cells).numel() == m * per
    with pytest.raises(ValueError, match=r"item vectors of shape \(54, 4\) \(fitted: \(54, 4\)\), expected \(54, k\) and \(54, 8\)"):
        clustered_assignment(vectors[:, :4], t)


def test_clustering_respects_capacity_when_lines_are_uneven() -> None:
    """A line with more items than a row holds overflows to other rows; no row exceeds C."""
    t = MEmComEmbeddingBagConfig(name="item", num_embeddings=40, embedding_dim=D, feature_names=["h"], num_buckets=5,
                                 assignment="clustered")
    g = torch.Generator().manual_seed(1)
    vectors = torch.randn(40, D, generator=g)
    vectors[:20] = torch.randn(1, D, generator=g) * torch.rand(20, 1, generator=g)  # 20 items on one line, C = 8
    cells, _, _ = clustered_assignment(vectors, t)
    assert int(torch.bincount(cells % 5, minlength=5).max()) <= t.hash_columns == 8


def test_clustering_on_one_space_fits_another() -> None:
    """Cluster on other vectors (a classifier's output rows), fit U and w to the table's vectors."""
    m, per, k = 5, 6, 12
    t = MEmComEmbeddingBagConfig(name="item", num_embeddings=m * per, embedding_dim=D, feature_names=["h"],
                                 num_buckets=m, assignment="clustered")
    g = torch.Generator().manual_seed(4)
    truth = torch.arange(m * per) % m
    other = torch.randn(m, k, generator=g)[truth] * (torch.rand(m * per, 1, generator=g) + 0.5)
    fit = torch.randn(m, D, generator=g)[truth] * (torch.rand(m * per, 1, generator=g) - 0.5)
    cells, U, w = clustered_assignment(other, t, fit_vectors=fit)
    rows = cells % m
    for line in range(m):
        assert torch.unique(rows[truth == line]).numel() == 1
    assert U.shape == (m, D)
    torch.testing.assert_close(w.unsqueeze(1) * U[rows], fit, atol=1e-4, rtol=0.0)


def test_line_fit_residual_measures_collinearity() -> None:
    from memcom_torchrec.modules.assignment import line_fit_residual

    g = torch.Generator().manual_seed(5)
    truth = torch.arange(40) % 4
    on_lines = torch.randn(4, D, generator=g)[truth] * torch.randn(40, 1, generator=g)
    assert line_fit_residual(on_lines, truth, 4) < 1e-8  # the planted rows: nothing missed
    assert line_fit_residual(on_lines, torch.arange(40) // 10, 4) > 0.3  # rows mixing the lines miss much
    one_each = torch.randn(40, D, generator=g)
    assert line_fit_residual(one_each, torch.arange(40), 40) < 1e-8  # one item per row: every item on its line


@pytest.mark.parametrize("variant", ["clustered", "clustered_2hash"])
def test_set_memcom_table_writes_every_entity_scalar_to_its_cell(variant: str) -> None:
    ebc = make(variant)
    t = ebc.embedding_bag_configs()[0]
    U = torch.randn(M, D)
    w = torch.randn(N, t.num_hashes)
    ebc.set_memcom_table("item", U, w)
    tensors = ebc.dense_tables("item")
    torch.testing.assert_close(tensors["U"], U)
    torch.testing.assert_close(tensors["w"], w)
    assert int((ebc._entity_weights["item"] == 1.0).sum()) == t.num_cells - N * t.num_hashes  # padding
    with pytest.raises(ValueError, match=r"table 'item': U \(9, 8\)"):
        ebc.set_memcom_table("item", U[:-1], w)
