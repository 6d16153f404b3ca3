"""Leave-last-out splitting and history lists, vectorised with numpy.

The input of `build_splits` is a block of complete user sequences sorted by
(user, timestamp, item). Every user needs at least 3 interactions: the last is
the test row, the second-to-last the validation row, the rest are training rows.
Every row's history is the user's previous items in time order (most recent
last), truncated to `history_len`; valid/test rows also carry `exclude`, every
item the user interacted with before the row.
"""

import os
from typing import Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from memcom_torchrec.data.manifest import SPLITS, sha256_file, split_schema

ROW_GROUP_SIZE = 65536


def gather_ranges(src: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Concatenates src[starts[k]:starts[k]+lengths[k]] for every k, without a Python loop.

    Returns:
        (values, offsets) with offsets[0] = 0 and len(offsets) = len(starts) + 1.
    """
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    if total == 0:
        return src[:0].copy(), offsets
    idx = np.arange(total, dtype=np.int64)
    idx += np.repeat(starts - offsets[:-1], lengths)
    return src[idx], offsets


def _list_array(values: np.ndarray, offsets: np.ndarray) -> pa.Array:
    if offsets[-1] >= 2**31:
        raise ValueError("block too large for list<int64> (int32 offsets); use smaller blocks")
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, pa.int64()))


def build_splits(
    user: np.ndarray, item: np.ndarray, timestamp: np.ndarray, history_len: int
) -> Dict[str, pa.Table]:
    """Splits complete user sequences into train/valid/test tables.

    Args:
        user: int64 user ids, sorted, every user's rows contiguous (>= 3 rows each).
        item: int64 item ids, in time order within each user.
        timestamp: int64 timestamps (non-decreasing within each user).
        history_len: keep at most this many most-recent items in `history`.

    Returns:
        {"train": table, "valid": table, "test": table} with the split schemas.
    """
    n = len(user)
    if n == 0:
        return {s: split_schema(s).empty_table() for s in SPLITS}
    idx = np.arange(n, dtype=np.int64)
    first = np.empty(n, dtype=bool)
    first[0] = True
    np.not_equal(user[1:], user[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    counts = np.diff(np.append(starts, n))
    if counts.min() < 3:
        raise ValueError("every user needs at least 3 interactions for a leave-last-out split")
    row_start = np.repeat(starts, counts)
    pos = idx - row_start
    row_count = np.repeat(counts, counts)
    masks = {"train": pos < row_count - 2, "valid": pos == row_count - 2, "test": pos == row_count - 1}
    out = {}
    for split, mask in masks.items():
        rows = np.flatnonzero(mask)
        hstart = np.maximum(row_start[rows], rows - history_len)
        hist_vals, hist_offs = gather_ranges(item, hstart, rows - hstart)
        cols = [
            pa.array(user[rows], pa.int64()),
            pa.array(item[rows], pa.int64()),
            pa.array(timestamp[rows], pa.int64()),
            _list_array(hist_vals, hist_offs),
        ]
        if split != "train":
            ex_vals, ex_offs = gather_ranges(item, row_start[rows], pos[rows])
            cols.append(_list_array(ex_vals, ex_offs))
        out[split] = pa.Table.from_arrays(cols, schema=split_schema(split))
    return out


class SplitWriter:
    """Writes the three splits as Parquet files, rolling to a new file every `rows_per_file` rows.

    Args:
        out_dir: dataset directory; files go to out_dir/{train,valid,test}/part-NNNNN.parquet.
        rows_per_file: start a new file once a file holds at least this many rows.
        row_group_size: rows per Parquet row group (the reader's unit of work).
    """

    def __init__(self, out_dir: str, rows_per_file: int = 4_000_000, row_group_size: int = ROW_GROUP_SIZE) -> None:
        self.out_dir = out_dir
        self.rows_per_file = rows_per_file
        self.row_group_size = row_group_size
        self._writers: Dict[str, Optional[pq.ParquetWriter]] = {s: None for s in SPLITS}
        self._files: Dict[str, List[Dict[str, object]]] = {s: [] for s in SPLITS}
        for s in SPLITS:
            os.makedirs(os.path.join(out_dir, s), exist_ok=True)

    def _open(self, split: str) -> pq.ParquetWriter:
        rel = os.path.join(split, f"part-{len(self._files[split]):05d}.parquet")
        self._files[split].append({"path": rel, "rows": 0})
        return pq.ParquetWriter(
            os.path.join(self.out_dir, rel),
            split_schema(split),
            # lz4 + dictionary pages: small files that decode at >2.5M rows/s per core.
            compression="lz4",
            use_dictionary=True,
        )

    def write(self, tables: Dict[str, pa.Table]) -> None:
        """Appends one block of split tables (as returned by `build_splits`)."""
        for split, table in tables.items():
            if table.num_rows == 0:
                continue
            w = self._writers[split]
            if w is None:
                w = self._writers[split] = self._open(split)
            w.write_table(table, row_group_size=self.row_group_size)
            entry = self._files[split][-1]
            entry["rows"] = int(entry["rows"]) + table.num_rows
            if int(entry["rows"]) >= self.rows_per_file:
                w.close()
                self._writers[split] = None

    def close(self) -> Dict[str, List[Dict[str, object]]]:
        """Closes open files. Returns {split: [{"path": relative path, "rows": n, "bytes": b, "sha256": h}, ...]}."""
        for split in SPLITS:
            w = self._writers[split]
            if w is not None:
                w.close()
                self._writers[split] = None
            if not self._files[split]:  # an empty split still gets one (empty) file
                self._writers[split] = self._open(split)
                self._writers[split].close()
                self._writers[split] = None
        for entries in self._files.values():
            for entry in entries:
                path = os.path.join(self.out_dir, str(entry["path"]))
                entry["bytes"], entry["sha256"] = os.path.getsize(path), sha256_file(path)
        return self._files
