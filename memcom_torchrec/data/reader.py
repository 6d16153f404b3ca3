"""Per-rank streaming reader: Parquet split files -> `Batch`es of KeyedJaggedTensors.

Rows of a split are numbered globally (files in order, Parquet row groups in order;
with `shuffle`, the row groups are permuted per epoch with a seed shared by all
ranks). Rank r of W owns the contiguous global rows [T*r//W, T*(r+1)//W): no
overlap, no loss. Every rank yields exactly ceil(T / (W * batch_size)) batches per
epoch, the trailing ones possibly smaller or empty, so collectives never hang.

A rank's rows are cut into windows of `shuffle_buffer` rows (a whole number of
batches); with `shuffle` each window is permuted before it is batched. Windows are
independent, so DataLoader workers take every num_workers-th window.

Decoding a row group's history lists is most of the reader's cost, so each row group
is decoded once per process, cut to `history_len` at once, and kept in a
process-wide cache up to `MEMCOM_READER_CACHE_MB` (default 256; 0 turns it off):
the trainer builds a reader per epoch, and every epoch after the first reads a
split that fits from memory. Row groups beyond the budget are streamed every epoch.
The cache is keyed by file path, size and modification time, so a replaced file is
read again.
"""

import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from memcom_torchrec.data.errors import DataError
from memcom_torchrec.data.manifest import (
    EXCLUDE,
    HISTORY,
    ITEM,
    USER,
    read_manifest,
    split_files,
)
from memcom_torchrec.data.splits import gather_ranges

SPARSE_KEYS: List[str] = ["user_id", "history"]
EXCLUDE_KEY = "exclude"


@dataclass
class Batch(Pipelineable):
    """One batch of interactions, ready for a TorchRec model.

    Args:
        sparse_features: KJT with keys ["user_id", "history"]: one user id per sample,
            and the bag of the sample's history item ids (possibly empty).
        labels: int64 target item id per sample.
        exclude: for valid/test rows, KJT with key ["exclude"]: the items each sample's
            user saw before (mask them in full-ranking evaluation); None for train.
        soft_targets: a teacher's ``B x num_items`` logits for this batch (distillation),
            attached by the trainer per step and never stored; None otherwise.
    """

    sparse_features: KeyedJaggedTensor
    labels: torch.Tensor
    exclude: Optional[KeyedJaggedTensor] = None
    soft_targets: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return int(self.labels.numel())

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return Batch(
            sparse_features=self.sparse_features.to(device=device, non_blocking=non_blocking),
            labels=self.labels.to(device=device, non_blocking=non_blocking),
            exclude=None if self.exclude is None else self.exclude.to(device=device, non_blocking=non_blocking),
            soft_targets=None if self.soft_targets is None else self.soft_targets.to(device=device,
                                                                                     non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.sparse_features.record_stream(stream)
        self.labels.record_stream(stream)
        if self.exclude is not None:
            self.exclude.record_stream(stream)
        if self.soft_targets is not None:
            self.soft_targets.record_stream(stream)

    def __reduce__(self):
        # Pickle the raw tensors (what DataLoader workers send), not the KJT's caches:
        # ~40x cheaper per batch.
        kjt, ex = self.sparse_features, self.exclude
        return (
            _rebuild_batch,
            (kjt.keys(), kjt.values(), kjt.lengths(), kjt.stride(), self.labels,
             None if ex is None else (ex.keys(), ex.values(), ex.lengths()), self.soft_targets),
        )

    def pin_memory(self) -> "Batch":
        return Batch(
            sparse_features=self.sparse_features.pin_memory(),
            labels=self.labels.pin_memory(),
            exclude=None if self.exclude is None else self.exclude.pin_memory(),
            soft_targets=None if self.soft_targets is None else self.soft_targets.pin_memory(),
        )


def _rebuild_batch(keys, values, lengths, stride, labels, ex, soft_targets=None) -> Batch:
    kjt = KeyedJaggedTensor(keys=keys, values=values, lengths=lengths, stride=stride)
    exclude = None
    if ex is not None:
        exclude = KeyedJaggedTensor(keys=ex[0], values=ex[1], lengths=ex[2], stride=stride)
    return Batch(sparse_features=kjt, labels=labels, exclude=exclude, soft_targets=soft_targets)


def _list_parts(arr: pa.ChunkedArray, max_len: Optional[int]) -> Tuple[np.ndarray, np.ndarray]:
    """(values int64, lengths int32) of a list<int64> column, optionally keeping the last max_len of each list."""
    a = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    offs = a.offsets.to_numpy()
    vals = a.values.to_numpy()
    lengths = np.diff(offs)
    if max_len is not None and len(lengths) and lengths.max() > max_len:
        starts = np.maximum(offs[:-1], offs[1:] - max_len)
        lengths = offs[1:] - starts
        vals, _ = gather_ranges(vals, starts, lengths)
        return vals, lengths.astype(np.int32)
    return vals[offs[0]:offs[-1]], lengths.astype(np.int32)


def _keep_last(table: pa.Table, column: str, max_len: Optional[int]) -> pa.Table:
    """``table`` with each list of ``column`` cut to its last ``max_len`` items (None: unchanged)."""
    if max_len is None or table.num_rows == 0:
        return table
    vals, lengths = _list_parts(table.column(column), max_len)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    lists = pa.ListArray.from_arrays(pa.array(offsets), pa.array(vals, type=pa.int64()))
    return table.set_column(table.schema.get_field_index(column), column, lists)


class _RowGroupCache:
    """Decoded row groups shared by this process's readers, least recently used out first, within a byte budget."""

    def __init__(self) -> None:
        self._tables: "OrderedDict[Tuple, pa.Table]" = OrderedDict()
        self.nbytes = 0

    @staticmethod
    def budget() -> int:
        value = os.environ.get("MEMCOM_READER_CACHE_MB", "256")
        try:
            mb = float(value)
        except ValueError:
            mb = -1.0
        if not mb >= 0:
            raise DataError(f"MEMCOM_READER_CACHE_MB={value!r}: give a size in MiB (0 turns the row-group cache off)")
        return int(mb * 2**20)

    def get(self, key: Tuple) -> Optional[pa.Table]:
        table = self._tables.get(key)
        if table is not None:
            self._tables.move_to_end(key)
        return table

    def put(self, key: Tuple, table: pa.Table) -> None:
        budget = self.budget()
        if table.nbytes > budget:
            return
        while self._tables and self.nbytes + table.nbytes > budget:
            self.nbytes -= self._tables.popitem(last=False)[1].nbytes
        self._tables[key] = table
        self.nbytes += table.nbytes

    def clear(self) -> None:
        self._tables.clear()
        self.nbytes = 0


_ROW_GROUPS = _RowGroupCache()


def table_to_batch(
    table: pa.Table, history_len: Optional[int] = None, with_exclude: bool = False, with_user: bool = True
) -> Batch:
    """Converts rows (columns user, item, history[, exclude]) into a `Batch`, vectorised.

    Args:
        table: the rows of one batch (possibly zero rows).
        history_len: keep at most this many most-recent history items (None: all stored).
        with_exclude: also build the `exclude` KJT (the table must have the column).
        with_user: put the `user_id` feature in `sparse_features` (False: `history` only,
            for models that take no user id, e.g. the phone-shaped ones).

    Returns:
        The batch.
    """
    n = table.num_rows
    user = table.column(USER).to_numpy()
    hist_vals, hist_lens = _list_parts(table.column(HISTORY), history_len)
    if with_user:
        keys = SPARSE_KEYS
        values = np.concatenate([user, hist_vals]).astype(np.int64, copy=False)
        lengths = np.concatenate([np.ones(n, dtype=np.int32), hist_lens])
    else:
        keys, values, lengths = [SPARSE_KEYS[1]], hist_vals.astype(np.int64, copy=False), hist_lens
    if not values.flags.writeable:  # a view of Arrow's buffer (histories already cut): torch wants its own
        values = values.copy()
    kjt = KeyedJaggedTensor(
        keys=keys, values=torch.from_numpy(values), lengths=torch.from_numpy(lengths), stride=n
    )
    labels = torch.from_numpy(np.array(table.column(ITEM).to_numpy(), dtype=np.int64))
    exclude = None
    if with_exclude:
        ex_vals, ex_lens = _list_parts(table.column(EXCLUDE), None)
        exclude = KeyedJaggedTensor(
            keys=[EXCLUDE_KEY],
            values=torch.from_numpy(np.array(ex_vals, dtype=np.int64)),
            lengths=torch.from_numpy(ex_lens),
            stride=n,
        )
    return Batch(sparse_features=kjt, labels=labels, exclude=exclude)


PAD_LABEL = -1


def pad_batch(batch: Batch, size: int) -> Batch:
    """Appends padding rows so the batch has ``size`` rows.

    TorchRec's row-wise sharding exchanges pooled embeddings with
    reduce-scatter/all-gather, which need the same batch size on every rank,
    while a rank's trailing batch may be smaller (or empty). Padding rows have
    empty bags for every feature, label ``PAD_LABEL`` (losses and metrics skip
    them) and nothing to exclude; real rows come first, unchanged.

    Args:
        batch (Batch): a batch of at most ``size`` rows.
        size (int): rows wanted.

    Returns:
        Batch: the padded batch (``batch`` itself if already ``size`` rows).
    """
    n = len(batch)
    if n == size:
        return batch
    if n > size:
        raise DataError(f"cannot pad a batch of {n} rows to {size}")
    pad = size - n

    def _pad(kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        lengths = kjt.lengths().view(len(kjt.keys()), n)
        zeros = torch.zeros(len(kjt.keys()), pad, dtype=lengths.dtype)
        return KeyedJaggedTensor(
            keys=kjt.keys(), values=kjt.values(), lengths=torch.cat([lengths, zeros], dim=1).reshape(-1), stride=size
        )

    labels = torch.cat([batch.labels, torch.full((pad,), PAD_LABEL, dtype=batch.labels.dtype)])
    exclude = None if batch.exclude is None else _pad(batch.exclude)
    return Batch(sparse_features=_pad(batch.sparse_features), labels=labels, exclude=exclude)


class InteractionBatchReader(IterableDataset):
    """Streams one rank's share of a prepared split as `Batch`es.

    Args:
        data_dir: a prepared dataset directory (see `read_manifest`).
        split: "train", "valid" or "test".
        batch_size: samples per batch (the trailing batches may be smaller or empty).
        rank: this process's rank.
        world_size: number of ranks.
        shuffle: permute row groups per epoch (same on all ranks) and rows within windows.
        shuffle_buffer: rows per shuffling window (rounded up to whole batches).
        seed: base seed for shuffling.
        epoch: epoch number (mixed into the seed); see `set_epoch`.
        history_len: truncate histories to the last `history_len` items (None: as stored).
        with_exclude: attach `exclude` to eval batches (default: True for valid/test).
        with_user: include the `user_id` feature (see `table_to_batch`).

    Example::

        reader = InteractionBatchReader("data/ml-1m", "train", 4096, rank, world_size, shuffle=True)
        for epoch in range(3):
            reader.set_epoch(epoch)
            for batch in reader:  # exactly len(reader) batches on every rank
                ...
    """

    def __init__(
        self,
        data_dir: str,
        split: str = "train",
        batch_size: int = 1024,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = False,
        shuffle_buffer: int = 65536,
        seed: int = 0,
        epoch: int = 0,
        history_len: Optional[int] = None,
        with_exclude: Optional[bool] = None,
        with_user: bool = True,
    ) -> None:
        super().__init__()
        if batch_size <= 0:
            raise DataError(f"batch_size must be > 0, got {batch_size}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.data_dir = data_dir
        self.split = split
        self.manifest = read_manifest(data_dir)
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = epoch
        self.history_len = history_len
        self.with_exclude = (split != "train") if with_exclude is None else with_exclude
        self.with_user = with_user
        self.columns = [USER, ITEM, HISTORY] + ([EXCLUDE] if self.with_exclude else [])
        self.files = split_files(data_dir, self.manifest, split)
        units: List[Tuple[int, int, int]] = []
        for fi, f in enumerate(self.files):
            md = self._metadata(f["path"])
            if md.num_rows != f["rows"]:
                raise DataError(f"{f['path']}: holds {md.num_rows} rows, the manifest says {f['rows']} (truncated or replaced?)")
            names = set(md.schema.to_arrow_schema().names)
            missing = [c for c in self.columns if c not in names]
            if missing:
                raise DataError(f"{f['path']}: missing column(s) {missing}; found {sorted(names)}")
            units += [(fi, g, md.row_group(g).num_rows) for g in range(md.num_row_groups)]
        self._units = np.array(units, dtype=np.int64).reshape(-1, 3)
        self.total_rows = int(self._units[:, 2].sum())
        self.row_begin = self.total_rows * rank // world_size
        self.row_end = self.total_rows * (rank + 1) // world_size
        self.num_batches = math.ceil(self.total_rows / (world_size * batch_size))
        self.batches_per_window = max(1, math.ceil(shuffle_buffer / batch_size))
        self._handles: Dict[int, Tuple[int, pq.ParquetFile]] = {}
        self._cache: Optional[Tuple[Tuple[int, int, int], pa.Table]] = None

    @staticmethod
    def _metadata(path: str) -> pq.FileMetaData:
        if not os.path.isfile(path):
            raise DataError(f"{path}: no such file (listed in the manifest)")
        try:
            return pq.read_metadata(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{path}: not a readable Parquet file (corrupt or truncated?): {e}") from e

    def __len__(self) -> int:
        return self.num_batches

    def __getstate__(self) -> dict:
        # Open files and the row-group cache stay with the process (spawned workers reopen).
        state = dict(self.__dict__)
        state["_handles"], state["_cache"] = {}, None
        return state

    @property
    def num_rows(self) -> int:
        """Rows this rank yields per epoch."""
        return self.row_end - self.row_begin

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch: it changes the shuffle, identically on every rank."""
        self.epoch = epoch

    def _file(self, fi: int) -> pq.ParquetFile:
        h = self._handles.get(fi)
        if h is None or h[0] != os.getpid():  # do not share handles across forked workers
            h = (os.getpid(), pq.ParquetFile(self.files[fi]["path"], memory_map=True))
            self._handles[fi] = h
        return h[1]

    def _unit_order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self._units))
        return np.random.default_rng([self.seed, self.epoch, 0x5EED]).permutation(len(self._units))

    def _read_rows(self, order: np.ndarray, ends: np.ndarray, a: int, b: int) -> pa.Table:
        """Global rows [a, b) in this epoch's row-group order."""
        parts = []
        k = int(np.searchsorted(ends, a, side="right"))
        while a < b:
            fi, g, rows = self._units[order[k]]
            start = int(ends[k] - rows)
            t = self._read_unit(int(fi), int(g))
            lo, hi = a - start, min(b, int(ends[k])) - start
            parts.append(t.slice(lo, hi - lo))
            a = start + hi
            k += 1
        if not parts:
            return self._empty()
        return pa.concat_tables(parts) if len(parts) > 1 else parts[0]

    def _read_unit(self, fi: int, g: int) -> pa.Table:
        """Row group ``g`` of file ``fi``, histories cut to ``history_len``: from the process's cache if held."""
        # One-entry cache: consecutive windows often share the row group at their boundary.
        if self._cache is not None and self._cache[0] == (os.getpid(), fi, g):
            return self._cache[1]
        path = self.files[fi]["path"]
        try:
            st = os.stat(path)
        except OSError as e:
            raise DataError(f"{path}: unreadable ({e})") from e
        key = (os.getpid(), path, st.st_size, st.st_mtime_ns, g, tuple(self.columns), self.history_len)
        t = _ROW_GROUPS.get(key)
        if t is None:
            try:
                t = self._file(fi).read_row_group(g, columns=self.columns)
            except (pa.ArrowInvalid, OSError) as e:
                raise DataError(f"{path}: row group {g} unreadable (corrupt or truncated?): {e}") from e
            t = _keep_last(t, HISTORY, self.history_len)
            _ROW_GROUPS.put(key, t)
        self._cache = ((os.getpid(), fi, g), t)
        return t

    def _empty(self) -> pa.Table:
        return pa.table({c: pa.array([], pa.int64() if c in (USER, ITEM) else pa.list_(pa.int64())) for c in self.columns})

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        order = self._unit_order()
        ends = np.cumsum(self._units[order, 2]) if len(order) else np.zeros(0, dtype=np.int64)
        bs, bpw = self.batch_size, self.batches_per_window
        window_rows = bs * bpw
        num_windows = math.ceil(self.num_batches / bpw)
        for w in range(worker, num_windows, num_workers):
            a = min(self.row_begin + w * window_rows, self.row_end)
            b = min(a + window_rows, self.row_end)
            table = self._read_rows(order, ends, a, b) if b > a else self._empty()
            if table.num_rows:
                table = table.combine_chunks()
            if self.shuffle and table.num_rows > 1:
                rng = np.random.default_rng([self.seed, self.epoch, self.rank, w])
                table = table.take(pa.array(rng.permutation(table.num_rows)))
            for j in range(w * bpw, min((w + 1) * bpw, self.num_batches)):
                lo = (j - w * bpw) * bs
                yield table_to_batch(table.slice(lo, bs), self.history_len, self.with_exclude, self.with_user)


def make_dataloader(
    data_dir: str,
    split: str = "train",
    batch_size: int = 1024,
    rank: int = 0,
    world_size: int = 1,
    shuffle: bool = False,
    shuffle_buffer: int = 65536,
    seed: int = 0,
    epoch: int = 0,
    history_len: Optional[int] = None,
    num_workers: int = 1,
    pin_memory: bool = False,
    prefetch_factor: int = 2,
    with_user: bool = True,
) -> DataLoader:
    """A torch DataLoader over an `InteractionBatchReader` (batches are built in the workers).

    Args:
        data_dir, split, batch_size, rank, world_size, shuffle, shuffle_buffer, seed, epoch,
            history_len: see `InteractionBatchReader`.
        num_workers: DataLoader worker processes (0: read in the calling process).
        pin_memory: pin batches (uses `Batch.pin_memory`) for fast host-to-device copies.
        prefetch_factor: batches prefetched per worker.
        with_user: include the `user_id` feature (see `table_to_batch`).

    Returns:
        A DataLoader yielding exactly `len(reader)` batches per epoch; call
        `loader.dataset.set_epoch(e)` before each epoch to reshuffle.
    """
    reader = InteractionBatchReader(
        data_dir, split, batch_size, rank, world_size, shuffle, shuffle_buffer, seed, epoch, history_len,
        with_user=with_user,
    )
    kwargs = {"prefetch_factor": prefetch_factor} if num_workers > 0 else {}
    return DataLoader(reader, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, **kwargs)
