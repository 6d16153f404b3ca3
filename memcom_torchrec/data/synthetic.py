"""Synthetic interactions from a planted low-rank preference model with Zipf-like popularity.

The model (rank `num_topics`):

- every item j has one topic z_j and a popularity weight p_j = 1 / (rank_j + 1) ** zipf_exponent,
  with rank_j a random permutation of the items (so popularity is Zipf-like);
- every user u has topic preferences theta_u ~ Dirichlet(user_concentration);
- each interaction of u draws a topic z ~ theta_u, then an item j in topic z with
  probability proportional to p_j.

So P(j | u) = theta_u[z_j] * p_j / P_z: a rank-`num_topics` factorisation that a model
can learn from the histories, and that a popularity ranker cannot. Users get at least
3 interactions (lognormal activity). A user never interacts twice with the same item
(repeats are re-drawn within the topic, then uniformly; users are capped at a quarter
of the items so this terminates; anything left is removed and counted).

Generation streams over blocks of whole users: memory is bounded by the block size
and the O(users + items) tables, never by the number of interactions. Every block has
its own random stream derived from (seed, block), so the output is deterministic.
"""

import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from memcom_torchrec.data.errors import DataError
from memcom_torchrec.data.manifest import (
    DEFAULT_HISTORY_LEN,
    FORMAT_VERSION,
    ITEMS_FILE,
    MANIFEST,
    SPLITS,
    USERS_FILE,
    write_manifest,
)
from memcom_torchrec.data.splits import SplitWriter, build_splits

logger = logging.getLogger(__name__)

PLANTED_USERS_FILE = "planted_user_topics.npy"


@dataclass
class SynthConfig:
    """Size and shape of a synthetic dataset.

    Args:
        num_users: users (each gets >= 3 interactions).
        num_items: items (the vocabulary; the least popular may never be drawn).
        num_interactions: total interactions (>= 3 * num_users).
        num_topics: rank of the planted preference model.
        zipf_exponent: item popularity exponent (1.0: classic Zipf).
        user_concentration: Dirichlet concentration of user topic preferences (small: focused users).
        activity_sigma: lognormal sigma of user activity (how uneven users are).
        history_len: history truncation (most recent items kept).
        seed: random seed; the same seed gives the same files.
        block_interactions: interactions generated per block (bounds memory).
        rows_per_file: rows per output Parquet file (train is sharded over several).
        max_redraws: rounds of re-drawing repeated (user, item) pairs.
    """

    num_users: int = 100_000
    num_items: int = 100_000
    num_interactions: int = 2_000_000
    num_topics: int = 32
    zipf_exponent: float = 1.0
    user_concentration: float = 0.1
    activity_sigma: float = 1.0
    history_len: int = DEFAULT_HISTORY_LEN
    seed: int = 0
    block_interactions: int = 1_000_000
    rows_per_file: int = 2_000_000
    max_redraws: int = 20

    def __post_init__(self) -> None:
        if self.num_users < 1 or self.num_items < 1 or self.num_topics < 1:
            raise DataError("num_users, num_items and num_topics must be >= 1")
        if self.num_interactions < 3 * self.num_users:
            raise DataError(
                f"num_interactions={self.num_interactions} is below 3 * num_users={3 * self.num_users}: "
                "every user needs >= 3 interactions for a train/valid/test split"
            )
        if self.num_topics > self.num_items:
            raise DataError(f"num_topics={self.num_topics} exceeds num_items={self.num_items}")


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([seed, *key])


def planted_items(config: SynthConfig) -> Tuple[np.ndarray, np.ndarray]:
    """(topic int64[num_items], popularity float64[num_items]) of the planted model."""
    rng = _rng(config.seed, 1)
    topic = rng.integers(0, config.num_topics, size=config.num_items, dtype=np.int64)
    topic[: config.num_topics] = np.arange(config.num_topics)  # no empty topic
    rank = rng.permutation(config.num_items)
    popularity = 1.0 / (rank + 1.0) ** config.zipf_exponent
    return topic, popularity


def _user_counts(config: SynthConfig) -> np.ndarray:
    """Interactions per user: >= 3, lognormal activity, capped at a quarter of the items."""
    rng = _rng(config.seed, 2)
    w = rng.lognormal(0.0, config.activity_sigma, size=config.num_users)
    cap = max(3, config.num_items // 4)
    if config.num_interactions > cap * config.num_users:
        raise DataError(
            f"num_interactions={config.num_interactions} needs more than {cap} interactions per user "
            f"(a quarter of num_items={config.num_items}); use more users or items"
        )
    counts = 3 + rng.multinomial(config.num_interactions - 3 * config.num_users, w / w.sum())
    while (counts > cap).any():  # hand the excess of capped users to the others
        excess = int(np.maximum(counts - cap, 0).sum())
        counts = np.minimum(counts, cap)
        room = np.where(counts < cap, w, 0.0)
        counts += rng.multinomial(excess, room / room.sum())
    return counts.astype(np.int64)


class _ItemSampler:
    """Draws items within topics in proportion to popularity (one searchsorted per draw)."""

    def __init__(self, topic: np.ndarray, popularity: np.ndarray, num_topics: int) -> None:
        self.order = np.argsort(topic, kind="stable")
        t = topic[self.order]
        w = popularity[self.order]
        cw = np.cumsum(w)
        starts = np.searchsorted(t, np.arange(num_topics))
        ends = np.append(starts[1:], len(t))
        base = np.where(starts > 0, cw[np.maximum(starts - 1, 0)], 0.0)
        total = cw[ends - 1] - base
        # key is in (z, z + 1] inside topic z and increasing overall.
        self.key = t + (cw - base[t]) / total[t]
        self.key[ends - 1] = np.arange(num_topics) + 1.0

    def draw(self, topics: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        u = rng.random(len(topics))
        pos = np.searchsorted(self.key, topics + u, side="left")
        return self.order[np.minimum(pos, len(self.order) - 1)]


def _block(
    config: SynthConfig, block: int, u0: int, counts: np.ndarray, sampler: _ItemSampler
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """One block of users: (user, item, timestamp, theta, removed repeats)."""
    rng = _rng(config.seed, 3, block)
    n_u = len(counts)
    theta = rng.dirichlet(np.full(config.num_topics, config.user_concentration), size=n_u)
    local = np.repeat(np.arange(n_u, dtype=np.int64), counts)
    cdf = np.cumsum(theta, axis=1)
    r = rng.random(len(local))
    topics = np.zeros(len(local), dtype=np.int64)
    for z in range(config.num_topics - 1):  # vectorised inverse-CDF over a small rank
        topics += r > cdf[local, z]
    items = sampler.draw(topics, rng)
    # No repeated (user, item) pairs: re-draw within the topic, then (rarely) uniformly.
    for rnd in range(2 * config.max_redraws):
        key = local * config.num_items + items
        order = np.argsort(key, kind="stable")
        dup = np.zeros(len(key), dtype=bool)
        dup[order[1:]] = key[order[1:]] == key[order[:-1]]
        if not dup.any():
            break
        idx = np.flatnonzero(dup)
        if rnd < config.max_redraws:
            items[idx] = sampler.draw(topics[idx], rng)
        else:
            items[idx] = rng.integers(0, config.num_items, size=len(idx))
    keep = ~dup
    # Users left with < 3 rows (never seen in practice) are dropped whole, and counted.
    left = np.bincount(local[keep], minlength=n_u)
    keep &= (left >= 3)[local]
    removed = int((~keep).sum())
    gaps = rng.geometric(1.0 / 3600.0, size=len(local)).astype(np.int64)
    start = 1_500_000_000 + rng.integers(0, 10**7, size=n_u)
    csum = np.cumsum(gaps)
    first = np.cumsum(counts) - counts
    ts = csum - np.repeat(csum[first] - gaps[first], counts) + np.repeat(start, counts)
    user = local + u0
    if removed:
        user, items, ts = user[keep], items[keep], ts[keep]
    return user, items, ts, theta, removed


def generate_synthetic(
    out_dir: str,
    config: SynthConfig = None,
    progress: bool = True,
    **overrides: Any,
) -> Dict[str, Any]:
    """Generates a synthetic dataset in the prepared layout (sharded Parquet, streamed).

    Args:
        out_dir: where the dataset is written (its splits are replaced).
        config: sizes and model parameters (see `SynthConfig`).
        progress: show a tqdm progress bar.
        **overrides: fields of `SynthConfig` (e.g. num_users=1000) applied on top of `config`.

    Returns:
        The manifest that was written.

    Example::

        m = generate_synthetic("data/synth", num_users=1000, num_items=5000, num_interactions=50_000)
    """
    config = SynthConfig(**{**(asdict(config) if config else {}), **overrides})
    t0 = time.time()
    topic, popularity = planted_items(config)
    sampler = _ItemSampler(topic, popularity, config.num_topics)
    counts = _user_counts(config)
    ends = np.cumsum(counts)
    cuts = np.unique(np.searchsorted(ends, np.arange(config.block_interactions, ends[-1], config.block_interactions)))
    bounds = np.concatenate([[0], cuts + 1, [config.num_users]])
    bounds = np.unique(np.minimum(bounds, config.num_users))

    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, MANIFEST)):  # a stale manifest must not outlive its files
        os.remove(os.path.join(out_dir, MANIFEST))
    for s in SPLITS:
        shutil.rmtree(os.path.join(out_dir, s), ignore_errors=True)
    theta_out = np.lib.format.open_memmap(
        os.path.join(out_dir, PLANTED_USERS_FILE), mode="w+", dtype=np.float32,
        shape=(config.num_users, config.num_topics),
    )
    writer = SplitWriter(out_dir, rows_per_file=config.rows_per_file)
    sizes = {s: 0 for s in SPLITS}
    item_counts = np.zeros(config.num_items, dtype=np.int64)
    user_counts = np.zeros(config.num_users, dtype=np.int64)
    removed = 0
    with tqdm(total=config.num_interactions, desc="synth", unit="row", unit_scale=True, disable=not progress) as bar:
        for block, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            user, item, ts, theta, rm = _block(config, block, int(a), counts[a:b], sampler)
            theta_out[a:b] = theta
            removed += rm
            user_counts[a:b] = np.bincount(user - a, minlength=b - a)
            item_counts += np.bincount(item, minlength=config.num_items)
            tables = build_splits(user, item, ts, config.history_len)
            for s, t in tables.items():
                sizes[s] += t.num_rows
            writer.write(tables)
            bar.update(int(counts[a:b].sum()))
    files = writer.close()
    theta_out.flush()
    del theta_out
    pq.write_table(
        pa.table({
            "original_id": pa.array(np.arange(config.num_users, dtype=np.int64)),
            "id": pa.array(np.arange(config.num_users, dtype=np.int64)),
            "num_interactions": pa.array(user_counts),
        }),
        os.path.join(out_dir, USERS_FILE),
    )
    pq.write_table(
        pa.table({
            "original_id": pa.array(np.arange(config.num_items, dtype=np.int64)),
            "id": pa.array(np.arange(config.num_items, dtype=np.int64)),
            "num_interactions": pa.array(item_counts),
            "topic": pa.array(topic),
            "popularity": pa.array(popularity),
        }),
        os.path.join(out_dir, ITEMS_FILE),
    )
    if removed:
        logger.warning("synthetic: removed %d repeated (user, item) rows left after %d redraws", removed, config.max_redraws)
    manifest = {
        "format_version": FORMAT_VERSION,
        "num_users": config.num_users,
        "num_items": config.num_items,
        "num_interactions": int(sum(sizes.values())),
        "splits": sizes,
        "history_len": config.history_len,
        "source": {"kind": "synthetic", "config": asdict(config),
                   "planted": {"items": f"{ITEMS_FILE}:topic,popularity", "users": PLANTED_USERS_FILE}},
        "sha256": None,
        "rows_read": config.num_interactions,
        "duplicates_removed": removed,
        "repeated_pairs": 0,
        "dropped_users": int((user_counts == 0).sum()),
        "dropped_rows": removed,
        "dropped_items": 0,
        "items_never_drawn": int((item_counts == 0).sum()),
        "files": files,
        "seconds": round(time.time() - t0, 3),
    }
    write_manifest(out_dir, manifest)
    return manifest
