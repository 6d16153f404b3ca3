"""Prepared-dataset layout: the manifest and the names every split file uses.

A prepared dataset directory holds::

    manifest.json            counts, split sizes, source and checksums
    users.parquet            original_id -> id (contiguous int64, 0-based)
    items.parquet            original_id -> id (contiguous int64, 0-based)
    train/ valid/ test/      Parquet files with columns USER, ITEM, TIMESTAMP,
                             HISTORY (and EXCLUDE for valid/test)
"""

import hashlib
import json
import os
from typing import Any, Dict, List

import pyarrow as pa

from memcom_torchrec.data.errors import DataError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
USERS_FILE = "users.parquet"
ITEMS_FILE = "items.parquet"
SPLITS = ("train", "valid", "test")
USER, ITEM, TIMESTAMP, HISTORY, EXCLUDE = "user", "item", "timestamp", "history", "exclude"
DEFAULT_HISTORY_LEN = 50

_IDS = pa.list_(pa.int64())
TRAIN_SCHEMA = pa.schema(
    [(USER, pa.int64()), (ITEM, pa.int64()), (TIMESTAMP, pa.int64()), (HISTORY, _IDS)]
)
EVAL_SCHEMA = TRAIN_SCHEMA.append(pa.field(EXCLUDE, _IDS))


def split_schema(split: str) -> pa.Schema:
    """Arrow schema of the rows of `split` ("train", "valid" or "test")."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    return TRAIN_SCHEMA if split == "train" else EVAL_SCHEMA


_REQUIRED = ("num_users", "num_items", "num_interactions", "splits", "history_len", "files")


def write_manifest(out_dir: str, manifest: Dict[str, Any]) -> str:
    """Writes `manifest` as `out_dir/manifest.json` (atomically). Returns its path."""
    path = os.path.join(out_dir, MANIFEST)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)
    return path


def read_manifest(data_dir: str) -> Dict[str, Any]:
    """Reads and checks the manifest of a prepared dataset.

    Args:
        data_dir: directory written by `prepare_movielens`, `prepare_interactions`
            or `generate_synthetic`.

    Returns:
        The manifest as a dict (num_users, num_items, num_interactions, splits,
        history_len, source, sha256, duplicates/dropped counts, files).
    """
    path = os.path.join(data_dir, MANIFEST)
    if not os.path.isfile(path):
        raise DataError(
            f"{path}: no manifest; prepare the dataset first with `memcom-data prepare` or `memcom-data synth`"
        )
    try:
        with open(path) as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise DataError(f"{path}: missing key(s) {missing}")
    return manifest


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def verify_dataset(data_dir: str) -> Dict[str, Any]:
    """Checks every split file of a prepared dataset against the checksums its manifest records.

    Returns:
        The manifest.

    Raises:
        DataError: naming the file, if one is missing, or its size or sha256 differs from the
            manifest's, or if the manifest records no checksums (written by an older version:
            prepare the dataset again).
    """
    manifest = read_manifest(data_dir)
    for split in SPLITS:
        for f in manifest["files"].get(split, []):
            path = os.path.join(data_dir, f["path"])
            if "sha256" not in f or "bytes" not in f:
                raise DataError(f"{os.path.join(data_dir, MANIFEST)}: no checksum for {f['path']}; prepare the dataset again")
            if not os.path.isfile(path):
                raise DataError(f"{path}: missing (the manifest lists it)")
            size = os.path.getsize(path)
            if size != int(f["bytes"]) or sha256_file(path) != f["sha256"]:
                raise DataError(
                    f"{path}: {size} bytes whose sha256 differs from the manifest's ({f['bytes']} bytes); "
                    "the file was changed or truncated: prepare the dataset again"
                )
    return manifest


def split_files(data_dir: str, manifest: Dict[str, Any], split: str) -> List[Dict[str, Any]]:
    """The files of `split` as [{"path": absolute path, "rows": n}, ...]."""
    split_schema(split)
    files = manifest["files"].get(split)
    if files is None:
        raise DataError(f"{os.path.join(data_dir, MANIFEST)}: no files listed for split {split!r}")
    return [{"path": os.path.join(data_dir, f["path"]), "rows": int(f["rows"])} for f in files]
