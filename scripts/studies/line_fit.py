"""How much of a warm-up's item vectors MEmCom's lines keep, per assignment (the measured collinearity).

Study script; its output is ``docs/ml1m_line_fit.txt`` (docs/RESULTS.md, the MEmCom-family variants section).

A MEmCom row holds collinear items (``w_i * U_b``). For the item vectors of a trained
warm-up (``memcom_clustered``'s ``warmup/`` run) this prints the share of their energy
that ``m`` lines miss when the items sit on MEmCom's rows ``i mod m``, on the rows
``memcom_clustered`` learns from those vectors, and on the rows learned from the
classifier's output layer (``--cluster-vectors output``), at the ratio's ``m``; and, for a
hashed warm-up, how many of the clustered rows' item pairs already shared a row of the
warm-up's ``U`` (what the clustering rediscovers of the sketch's own collisions):

    .venv/bin/python scripts/studies/line_fit.py runs/ml1m_tuned/runs/memcom_clustered_r16_s0_lr0.1/warmup
"""

import argparse

import torch

from memcom_torchrec.models.builder import load_trained_model
from memcom_torchrec.modules.assignment import clustered_assignment, line_fit_residual
from memcom_torchrec.modules.methods import TableSpec, get_method
from memcom_torchrec.train.assignment import entity_vectors


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("warmup", help="run directory or checkpoint of the warm-up")
    p.add_argument("--ratio", type=float, default=0.0, help="default: the warm-up's own ratio")
    args = p.parse_args()
    model, meta = load_trained_model(args.warmup)
    cfg = meta["config"]
    collection = model.model.embeddings
    item = next(t for t in collection.embedding_bag_configs() if t.name == "item")
    ratio = args.ratio or float(cfg["compression_ratio"])
    table = get_method("memcom_clustered").table_config(
        TableSpec("item", item.num_embeddings, list(item.feature_names), item.pooling), item.embedding_dim, ratio)
    vectors = entity_vectors(collection, item)
    m = table.num_buckets
    rows = {"MEmCom's i mod m": torch.arange(item.num_embeddings) % m}
    rows["clustered on the table's vectors"] = clustered_assignment(vectors, table, seed=int(cfg["seed"]))[0] % m
    output = getattr(model.model, "output", None)
    if output is not None and output.out_features == item.num_embeddings:
        rows["clustered on the output rows"] = clustered_assignment(
            output.weight.detach(), table, seed=int(cfg["seed"]), fit_vectors=vectors)[0] % m
    print(f"{args.warmup}: {item.num_embeddings} items, d={item.embedding_dim}, {m} rows of U at {ratio:g}x")
    for name, r in rows.items():
        print(f"  {name:<34} lines miss {100 * line_fit_residual(vectors, r, m):5.1f}% of the vectors' energy")
    warm_rows = collection.dense_tables("item").get("rows")
    if warm_rows is not None:  # a hashed warm-up: its rows of U per item (n x k)
        shared = (warm_rows.unsqueeze(1).unsqueeze(3) == warm_rows.unsqueeze(0).unsqueeze(2)).flatten(2).any(2)
        others = ~torch.eye(item.num_embeddings, dtype=torch.bool)
        for name, r in rows.items():
            mates = (r.unsqueeze(0) == r.unsqueeze(1)) & others
            print(f"  {name:<34} {100 * float((mates & shared).sum()) / float(mates.sum()):5.1f}% of its row-mates "
                  f"shared a warm-up row (all pairs: {100 * float((shared & others).sum()) / float(others.sum()):.1f}%)")


if __name__ == "__main__":
    main()
