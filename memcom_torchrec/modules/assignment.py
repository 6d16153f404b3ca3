"""Stored assignments of the MEmCom family: which cell of the ``w`` grid (and so which row of ``U``) each entity gets.

A cell ``s`` is row ``s mod m`` of ``U`` and column ``s // m`` of the ``(m, C)``
grid of ``w`` (``memcom_configs``). Two ways to choose the cells:

- ``frequency_assignment``: the ``H`` most frequent entities each alone in a row
  (column 0 of rows ``0..H-1``); the rest dealt round-robin, most frequent first,
  over the other ``m - H`` rows, so no tail row collects the popular tail.
- ``clustered_assignment``: a balanced clustering of item vectors into ``m``
  lines through the origin (MEmCom's bucket is a line: ``w_i * U_b``). Lloyd
  iterations alternate "each item to the line it is closest to" and "each line
  its members' principal direction"; the final assignment respects the grid's
  capacity ``C`` per row (greedy over item/line pairs, best fit first). It also
  returns MEmCom's best start from there: ``U_b`` the direction scaled to its
  members' RMS projection, ``w_i`` the projection over that scale.

Both are deterministic for a given input (and seed).
"""

from typing import Optional, Tuple

import torch

from memcom_torchrec.modules.memcom_configs import MEmComEmbeddingBagConfig

# Above this many item/line pairs the balanced assignment's sort would need gigabytes.
MAX_ASSIGNMENT_PAIRS: int = 50_000_000


def cells_from_rows(rows: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Cells for entities given their rows of ``U``: members of a row take columns 0, 1, ... in entity order.

    Args:
        rows (torch.Tensor): ``n`` rows in ``[0, m)``.
        num_buckets (int): ``m``.

    Returns:
        torch.Tensor: ``n`` cells, ``row + m * column`` (int64).
    """
    order = torch.argsort(rows, stable=True)
    sorted_rows = rows[order]
    counts = torch.bincount(sorted_rows, minlength=num_buckets)
    starts = torch.cumsum(counts, 0) - counts
    column = torch.arange(rows.numel()) - starts[sorted_rows]
    cells = torch.empty_like(rows)
    cells[order] = sorted_rows + num_buckets * column
    return cells


def frequency_assignment(counts: torch.Tensor, config: MEmComEmbeddingBagConfig) -> torch.Tensor:
    """Cells of a ``"frequency"`` table from training counts.

    Args:
        counts (torch.Tensor): ``n`` training interactions per entity.
        config (MEmComEmbeddingBagConfig): the table (``num_head_buckets`` ``H``, ``num_buckets`` ``m``).

    Returns:
        torch.Tensor: ``n`` cells (int64): head entity ``r`` (``r``-th most frequent,
        ties by id) in row ``r``; tail entity ``t`` (by frequency) in row ``H + t mod (m - H)``.

    Raises:
        ValueError: ``counts`` has the wrong length.
    """
    n, m, head = config.num_embeddings, config.num_buckets, config.num_head_buckets
    if counts.numel() != n:
        raise ValueError(f"table '{config.name}': {counts.numel()} counts for {n} entities")
    order = torch.argsort(-counts.double(), stable=True)  # most frequent first, ties by id
    t = torch.arange(n - head)  # the tail, by frequency: row H + t mod (m - H), column t // (m - H)
    cells = torch.empty(n, dtype=torch.long)
    cells[order] = torch.cat([torch.arange(head), head + t % (m - head) + m * (t // (m - head))])
    return cells


def _principal_directions(vectors: torch.Tensor, rows: torch.Tensor, directions: torch.Tensor, steps: int = 3) -> torch.Tensor:
    """Each line's members' principal direction (power iteration from ``directions``; empty lines keep theirs)."""
    m, d = directions.shape
    for _ in range(steps):
        proj = (vectors * directions[rows]).sum(1, keepdim=True)  # <e_i, u_b>
        moved = torch.zeros(m, d, dtype=vectors.dtype).index_add_(0, rows, proj * vectors)  # M_b u_b
        norm = moved.norm(dim=1, keepdim=True)
        directions = torch.where(norm > 1e-12, moved / norm.clamp_min(1e-12), directions)
    return directions


def _member_lines(vectors: torch.Tensor, rows: torch.Tensor, m: int, steps: int) -> torch.Tensor:
    """Each row's line for given members: power iteration from the members' mean direction."""
    start = torch.zeros(m, vectors.shape[1], dtype=vectors.dtype).index_add_(0, rows, vectors)
    start = start + 1e-12 * torch.eye(m, vectors.shape[1], dtype=vectors.dtype)  # an empty row keeps a direction
    return _principal_directions(vectors, rows, start / start.norm(dim=1, keepdim=True), steps=steps)


def _seed_lines(vectors: torch.Tensor, m: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ for lines: each next line through an item drawn in proportion to its squared distance to the lines so far."""
    units = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sq = vectors.pow(2).sum(1)
    chosen = [int(torch.randint(vectors.shape[0], (1,), generator=generator))]
    residual = sq - (vectors @ units[chosen[0]]).pow(2)
    for _ in range(1, m):
        weights = residual.clamp_min(0)
        if float(weights.sum()) <= 0:  # every item already on a line: any item not yet chosen
            weights = torch.ones_like(weights)
            weights[chosen] = 0
        nxt = int(torch.multinomial(weights, 1, generator=generator))
        chosen.append(nxt)
        residual = torch.minimum(residual, sq - (vectors @ units[nxt]).pow(2))
    return units[chosen]


def _balanced_rows(scores: torch.Tensor, capacity: int) -> torch.Tensor:
    """Rows for every item, at most ``capacity`` per row, best ``scores`` first (greedy)."""
    n, m = scores.shape
    rows = torch.full((n,), -1, dtype=torch.long)
    load = torch.zeros(m, dtype=torch.long)
    order = torch.argsort(scores.reshape(-1), descending=True, stable=True)
    items, lines = (order // m).tolist(), (order % m).tolist()
    rows_list, load_list, placed = rows.tolist(), load.tolist(), 0
    for i, b in zip(items, lines):
        if rows_list[i] < 0 and load_list[b] < capacity:
            rows_list[i] = b
            load_list[b] += 1
            placed += 1
            if placed == n:
                break
    return torch.tensor(rows_list, dtype=torch.long)


def clustered_assignment(
    vectors: torch.Tensor,
    config: MEmComEmbeddingBagConfig,
    seed: int = 0,
    iterations: int = 15,
    fit_vectors: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cells of a ``"clustered"`` table, and MEmCom's ``U`` and ``w`` fitted to them.

    Args:
        vectors (torch.Tensor): ``n x k`` item vectors to cluster (e.g. a trained sketch's, or
            a classifier's output rows).
        config (MEmComEmbeddingBagConfig): the table (``m`` rows, capacity ``C``).
        seed (int): seeds the initial lines (k-means++ over lines through ``m`` items).
        iterations (int): Lloyd iterations before the balanced assignment.
        fit_vectors (Optional[torch.Tensor]): ``n x d`` vectors ``U`` and ``w`` are fitted to
            (default: ``vectors``, then ``k = d``).

    Returns:
        Tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ``cells`` (``n``, int64),
        ``U`` (``m x d``) and ``w`` (``n``), with ``w[i] * U[cells[i] mod m]`` the
        best fit of item ``i``'s fit vector on its row's line.

    Raises:
        ValueError: wrong shapes, or too many item/line pairs for the balanced assignment.
    """
    n, m, capacity = config.num_embeddings, config.num_buckets, config.hash_columns
    fit = vectors if fit_vectors is None else fit_vectors
    if vectors.dim() != 2 or vectors.shape[0] != n or tuple(fit.shape) != (n, config.embedding_dim):
        raise ValueError(
            f"table '{config.name}': item vectors of shape {tuple(vectors.shape)} (fitted: {tuple(fit.shape)}), "
            f"expected ({n}, k) and ({n}, {config.embedding_dim})"
        )
    if n * m > MAX_ASSIGNMENT_PAIRS:
        raise ValueError(
            f"table '{config.name}': {n} items x {m} rows exceed {MAX_ASSIGNMENT_PAIRS} pairs for the balanced "
            "assignment; use the 'frequency' or 'hash' assignment for a table this large"
        )
    e = vectors.detach().double().cpu()
    directions = _seed_lines(e, m, torch.Generator().manual_seed(seed))
    for _ in range(iterations):
        rows = (e @ directions.t()).abs().argmax(1)
        directions = _principal_directions(e, rows, directions)
    rows = _balanced_rows((e @ directions.t()).pow(2), capacity)
    f = fit.detach().double().cpu()
    if fit_vectors is None:
        directions = _principal_directions(f, rows, directions)
    else:  # the fitted space's lines
        directions = _member_lines(f, rows, m, steps=10)
    proj = (f * directions[rows]).sum(1)  # w_i * |U_b| with unit U_b
    counts = torch.bincount(rows, minlength=m).clamp_min(1).double()
    scale = (torch.zeros(m, dtype=f.dtype).index_add_(0, rows, proj.pow(2)) / counts).sqrt().clamp_min(1e-6)
    U = directions * scale.unsqueeze(1)
    w = proj / scale[rows]
    return cells_from_rows(rows, m), U.float(), w.float()


def line_fit_residual(vectors: torch.Tensor, rows: torch.Tensor, num_buckets: int) -> float:
    """Share of ``sum |e_i|^2`` that ``m`` lines through the origin miss with items on ``rows``.

    What MEmCom's collinearity costs a set of item vectors for a given assignment: each
    row's best line (its members' principal direction) and each item's projection on it.
    Args: ``vectors`` ``n x d``; ``rows`` ``n`` rows in ``[0, m)``; ``num_buckets`` ``m``.
    """
    e = vectors.detach().double().cpu()
    directions = _member_lines(e, rows, num_buckets, steps=20)
    proj = (e * directions[rows]).sum(1, keepdim=True)
    return float((e - proj * directions[rows]).pow(2).sum() / e.pow(2).sum().clamp_min(1e-30))
