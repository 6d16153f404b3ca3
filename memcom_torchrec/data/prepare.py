"""Interaction logs (CSV/TSV/Parquet or an Arrow table) -> a prepared dataset directory."""

import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
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
    sha256_file,
    write_manifest,
)
from memcom_torchrec.data.splits import SplitWriter, build_splits

logger = logging.getLogger(__name__)

BLOCK_ROWS = 1_000_000  # rows per split/history block: bounds the memory of history building


@dataclass
class PrepareConfig:
    """What varies when preparing an interaction log.

    Args:
        history_len: keep at most this many most-recent items in each row's history.
        min_user_interactions: users with fewer interactions are dropped (and counted);
            at least 3 are needed for a train/valid/test split.
        string_ids: keep user/item ids as strings (e.g. titles); otherwise they must be integers.
        rows_per_file: rows per output Parquet file.
    """

    history_len: int = DEFAULT_HISTORY_LEN
    min_user_interactions: int = 3
    string_ids: bool = False
    rows_per_file: int = 4_000_000

    def __post_init__(self) -> None:
        if self.history_len < 0:
            raise DataError(f"history_len must be >= 0, got {self.history_len}")
        if self.min_user_interactions < 3:
            raise DataError(f"min_user_interactions must be >= 3 for a leave-last-out split, got {self.min_user_interactions}")


def read_interaction_file(path: str, delimiter: Optional[str] = None) -> pa.Table:
    """Reads a CSV/TSV (any extension but .parquet) or a Parquet file into an Arrow table.

    Args:
        path: the file.
        delimiter: CSV delimiter; default tab for .tsv/.inter/.dat files, comma otherwise.

    Returns:
        The table, every column as Arrow inferred it (ids are checked later).
    """
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: the file is empty (0 bytes)")
    if path.endswith((".parquet", ".pq")):
        try:
            return pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{path}: not a readable Parquet file (corrupt or truncated?): {e}") from e
    if delimiter is None:
        delimiter = "\t" if path.endswith((".tsv", ".inter", ".dat", ".txt")) else ","
    try:
        return pacsv.read_csv(
            path,
            parse_options=pacsv.ParseOptions(delimiter=delimiter),
        )
    except pa.ArrowInvalid as e:
        raise DataError(f"{path}: cannot parse as delimited text (delimiter {delimiter!r}): {e}") from e


def _first_bad(col: pa.ChunkedArray, ok: pa.ChunkedArray) -> str:
    ok = pc.fill_null(ok, False)
    bad = np.flatnonzero(~ok.to_numpy(zero_copy_only=False))
    i = int(bad[0])
    return f"{len(bad)} bad value(s), first at row {i}: {col[i].as_py()!r}"


def _int_ids(col: pa.ChunkedArray, where: str) -> pa.ChunkedArray:
    """Casts an id column to int64, or raises DataError naming the first non-integer value."""
    t = col.type
    if pa.types.is_integer(t):
        return col.cast(pa.int64())
    if pa.types.is_floating(t):
        ok = pc.equal(col, pc.floor(col))
        if not pc.all(ok).as_py():
            raise DataError(f"{where}: ids must be integers; {_first_bad(col, ok)} (pass string_ids / --string-ids to keep string ids)")
        return col.cast(pa.int64())
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        ok = pc.match_substring_regex(pc.utf8_trim_whitespace(col), r"^[+-]?\d+$")
        if not pc.all(ok).as_py():
            raise DataError(f"{where}: ids must be integers; {_first_bad(col, ok)} (pass string_ids / --string-ids to keep string ids)")
        return pc.utf8_trim_whitespace(col).cast(pa.int64())
    raise DataError(f"{where}: ids must be integers, got column type {t}")


def _timestamps(col: pa.ChunkedArray, where: str) -> np.ndarray:
    t = col.type
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        col = col.cast(pa.int64()) if pa.types.is_timestamp(t) else col.cast(pa.timestamp("s")).cast(pa.int64())
    elif pa.types.is_floating(t):
        col = pc.floor(col).cast(pa.int64())
    elif pa.types.is_string(t) or pa.types.is_large_string(t):
        try:
            col = col.cast(pa.int64())
        except pa.ArrowInvalid:
            try:
                col = col.cast(pa.timestamp("s")).cast(pa.int64())
            except pa.ArrowInvalid as e:
                raise DataError(f"{where}: timestamps must be numbers or ISO dates: {e}") from e
    elif not pa.types.is_integer(t):
        raise DataError(f"{where}: timestamps must be numbers or dates, got column type {t}")
    return col.cast(pa.int64()).to_numpy()


def _encode_sorted(col: pa.ChunkedArray) -> tuple:
    """(codes int64 numpy, dictionary sorted ascending): code i <-> dictionary[i]."""
    enc = pc.dictionary_encode(col).combine_chunks()
    dictionary = enc.dictionary
    order = pc.sort_indices(dictionary).to_numpy()
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order), dtype=np.int64)
    codes = rank[enc.indices.to_numpy(zero_copy_only=False)]
    return codes, dictionary.take(pa.array(order))


def prepare_table(
    table: pa.Table,
    user_col: str,
    item_col: str,
    time_col: str,
    out_dir: str,
    config: Optional[PrepareConfig] = None,
    source: Optional[Dict[str, Any]] = None,
    where: str = "input",
) -> Dict[str, Any]:
    """Validates, de-duplicates, re-indexes and splits an interaction table, then writes the dataset.

    Args:
        table: the interactions, one row each.
        user_col, item_col, time_col: the columns holding user id, item id and timestamp.
        out_dir: the output directory (replaced if it already holds a prepared dataset).
        config: see `PrepareConfig`.
        source: provenance recorded in the manifest (kind, path or package, sha256...).
        where: name of the input for error messages (e.g. the file path).

    Returns:
        The manifest that was written.
    """
    config = config or PrepareConfig()
    t0 = time.time()
    missing = [c for c in (user_col, item_col, time_col) if c not in table.column_names]
    if missing:
        raise DataError(f"{where}: missing column(s) {missing}; found {table.column_names}")
    if table.num_rows == 0:
        raise DataError(f"{where}: no interactions (the table has a header but no rows)")
    for c in (user_col, item_col, time_col):
        nulls = table[c].null_count
        if nulls:
            i = int(np.flatnonzero(pc.is_null(table[c]).to_numpy(zero_copy_only=False))[0])
            raise DataError(f"{where}: column {c!r} has {nulls} null value(s), first at row {i}")
    cols = {}
    for c in (user_col, item_col):
        if config.string_ids:
            cols[c] = table[c].cast(pa.string())
        else:
            cols[c] = _int_ids(table[c], f"{where}: column {c!r}")
    ts = _timestamps(table[time_col], f"{where}: column {time_col!r}")
    num_rows_in = table.num_rows
    with tqdm(total=5, desc="prepare", unit="step", leave=False) as bar:
        u_codes, u_dict = _encode_sorted(cols[user_col])
        i_codes, i_dict = _encode_sorted(cols[item_col])
        bar.update()
        # Sort by (user, timestamp, item): ties in time broken by item id, deterministically.
        order = np.lexsort((i_codes, ts, u_codes))
        u_codes, i_codes, ts = u_codes[order], i_codes[order], ts[order]
        dup = np.zeros(len(order), dtype=bool)
        dup[1:] = (u_codes[1:] == u_codes[:-1]) & (i_codes[1:] == i_codes[:-1]) & (ts[1:] == ts[:-1])
        duplicates = int(dup.sum())
        if duplicates:
            logger.warning("%s: removed %d exact duplicate (user, item, timestamp) rows", where, duplicates)
            keep = ~dup
            u_codes, i_codes, ts = u_codes[keep], i_codes[keep], ts[keep]
        pair = u_codes * len(i_dict) + i_codes
        repeated_pairs = int(len(pair) - len(np.unique(pair)))
        del pair
        bar.update()
        # Drop users with too few interactions for a split (counted, never silent).
        ucount = np.bincount(u_codes, minlength=len(u_dict))
        keep_user = ucount >= config.min_user_interactions
        dropped_users = int((~keep_user[ucount > 0]).sum())
        dropped_rows = 0
        if dropped_users:
            keep = keep_user[u_codes]
            dropped_rows = int((~keep).sum())
            logger.warning(
                "%s: dropped %d user(s) with fewer than %d interactions (%d rows)",
                where, dropped_users, config.min_user_interactions, dropped_rows,
            )
            u_codes, i_codes, ts = u_codes[keep], i_codes[keep], ts[keep]
        if len(u_codes) == 0:
            raise DataError(f"{where}: no user has at least {config.min_user_interactions} interactions")
        # Contiguous 0-based ids over what is kept, in sorted original-id order.
        kept_u, u_ids = np.unique(u_codes, return_inverse=True)
        kept_i, i_ids = np.unique(i_codes, return_inverse=True)
        dropped_items = int(len(i_dict) - len(kept_i))
        u_ids = u_ids.astype(np.int64)
        i_ids = i_ids.astype(np.int64)
        bar.update()

        if os.path.exists(os.path.join(out_dir, MANIFEST)):  # a stale manifest must not outlive its files
            os.remove(os.path.join(out_dir, MANIFEST))
        if os.path.isdir(out_dir):
            for s in SPLITS:
                shutil.rmtree(os.path.join(out_dir, s), ignore_errors=True)
        os.makedirs(out_dir, exist_ok=True)
        pq.write_table(
            pa.table({
                "original_id": u_dict.take(pa.array(kept_u)),
                "id": pa.array(np.arange(len(kept_u), dtype=np.int64)),
                "num_interactions": pa.array(np.bincount(u_ids, minlength=len(kept_u)).astype(np.int64)),
            }),
            os.path.join(out_dir, USERS_FILE),
        )
        pq.write_table(
            pa.table({
                "original_id": i_dict.take(pa.array(kept_i)),
                "id": pa.array(np.arange(len(kept_i), dtype=np.int64)),
                "num_interactions": pa.array(np.bincount(i_ids, minlength=len(kept_i)).astype(np.int64)),
            }),
            os.path.join(out_dir, ITEMS_FILE),
        )
        bar.update()
        # Blocks of whole users, about BLOCK_ROWS rows each.
        n = len(u_ids)
        user_starts = np.flatnonzero(np.r_[True, u_ids[1:] != u_ids[:-1]])
        cut = np.unique(np.searchsorted(user_starts, np.arange(0, n, BLOCK_ROWS)))
        bounds = np.append(user_starts[cut[cut < len(user_starts)]], n)
        writer = SplitWriter(out_dir, rows_per_file=config.rows_per_file)
        sizes = {s: 0 for s in SPLITS}
        for a, b in tqdm(list(zip(bounds[:-1], bounds[1:])), desc="write splits", unit="block", leave=False,
                         disable=None):  # nested: shown on a terminal only
            tables = build_splits(u_ids[a:b], i_ids[a:b], ts[a:b], config.history_len)
            for s, t in tables.items():
                sizes[s] += t.num_rows
            writer.write(tables)
        files = writer.close()
        bar.update()
    manifest = {
        "format_version": FORMAT_VERSION,
        "num_users": int(len(kept_u)),
        "num_items": int(len(kept_i)),
        "num_interactions": int(n),
        "splits": sizes,
        "history_len": config.history_len,
        "source": source or {"kind": "table"},
        "sha256": (source or {}).get("sha256"),
        "rows_read": int(num_rows_in),
        "duplicates_removed": duplicates,
        "repeated_pairs": repeated_pairs,
        "dropped_users": dropped_users,
        "dropped_rows": dropped_rows,
        "dropped_items": dropped_items,
        "config": asdict(config),
        "files": files,
        "seconds": round(time.time() - t0, 3),
    }
    write_manifest(out_dir, manifest)
    return manifest


def prepare_interactions(
    path: str,
    user_col: str,
    item_col: str,
    time_col: str,
    out_dir: str,
    history_len: int = DEFAULT_HISTORY_LEN,
    min_user_interactions: int = 3,
    string_ids: bool = False,
    delimiter: Optional[str] = None,
    sha256: Optional[str] = None,
) -> Dict[str, Any]:
    """Prepares a user-supplied interaction log (CSV, TSV or Parquet).

    Args:
        path: the log file.
        user_col, item_col, time_col: its user id, item id and timestamp columns.
        out_dir: where the dataset is written.
        history_len: history truncation (most recent items kept).
        min_user_interactions: users with fewer interactions are dropped and counted.
        string_ids: accept non-integer ids (mapped to contiguous ints like any other).
        delimiter: CSV delimiter (default: tab for .tsv/.inter/.dat/.txt, comma otherwise).
        sha256: if given, the file's expected sha256; a mismatch is an error.

    Returns:
        The manifest that was written.
    """
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    digest = sha256_file(path)
    if sha256 is not None and digest != sha256.lower():
        raise DataError(f"{path}: checksum mismatch: sha256 is {digest}, expected {sha256.lower()}")
    table = read_interaction_file(path, delimiter)
    config = PrepareConfig(history_len=history_len, min_user_interactions=min_user_interactions, string_ids=string_ids)
    source = {"kind": "file", "path": os.path.abspath(path), "sha256": digest,
              "columns": {"user": user_col, "item": item_col, "timestamp": time_col}}
    return prepare_table(table, user_col, item_col, time_col, out_dir, config, source, where=path)
