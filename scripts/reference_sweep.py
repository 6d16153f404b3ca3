"""Plain-PyTorch replica of the ML-1M next-item protocol, for fast hyperparameter sweeps on one GPU.

Why: one ML-1M run of the real job (TorchRec + FBGEMM, ``memcom-experiment``)
takes 10-35 minutes on the 2-core CI machine, so a learning-rate search over
every method and ratio does not fit there. The CUDA FBGEMM wheel cannot travel
to the lent GPU machine (see DESIGN.md), so this script re-implements the same
math with nothing but torch: the same model (mean-pooled last-10 history +
user id -> 256 ReLU -> softmax over all items), the same initialisation, the
same row-wise Adagrad for tables (Adam 1e-3 for dense layers), batch 512, the
same splits, exclusion and nDCG@10. It is a *reference* used to choose
hyperparameters and to see the whole grid; the README's headline table comes
from ``memcom-experiment``. Known differences: it shuffles all training rows
each epoch (the real reader shuffles row groups, then rows within 64k-row
windows).

The methods and their table sizes come from the package's method registry at
``pack`` time: each (method, ratio) cell is stored as a *layout* (the roles of
its tensors, as the collection's ``dense_tables`` hands them over, and its
bucket count), and the replica builds its item table from the layout alone, so
``run`` needs nothing but torch and a new registered method needs no change here.

Two steps:

    # here (needs pyarrow and this package): data + table sizes -> one file
    .venv/bin/python scripts/reference_sweep.py pack --data data/ml-1m --out sweep/ml1m.pt
    # anywhere with torch (a GPU machine): run the sweep, one JSON line per run
    python scripts/reference_sweep.py run --pack sweep/ml1m.pt --out results.jsonl
    # the table: per cell, every config's validation score and the choice
    python scripts/reference_sweep.py report --results docs/reference_sweep.jsonl
"""

import argparse
import itertools
import json
import math
import os
import time
from typing import TYPE_CHECKING, Dict, List

import torch
import torch.multiprocessing as mp
from torch import nn

if TYPE_CHECKING:  # the package is imported by pack only: the replica runs without it
    from memcom_torchrec.modules.storage import TableStorage

HISTORY = 10
DIM = 64
RATIOS = [2.0, 4.0, 8.0, 16.0, 40.0]


# ---------------------------------------------------------------------------
# pack: parquet splits -> tensors, table sizes from the package's own rules


def layout_of(storage: "TableStorage") -> Dict:
    """A table's layout as ``pack`` stores it: its roles and their shapes (assignments are added by ``pack``).

    Args:
        storage (TableStorage): the table config's storage description.

    Returns:
        Dict: ``{"roles": [...], "shapes": {role: [sizes]}}``, what ``ItemTable`` builds from.
    """
    return {"roles": list(storage.roles), "shapes": {k: list(v) for k, v in storage.shapes.items()}}


def pack(data: str, out: str) -> None:
    """Packs a prepared dataset's splits and every (method, ratio) cell's layout into one ``torch.save`` file.

    Args:
        data (str): a prepared dataset (``memcom-data prepare``).
        out (str): the pack to write (read by ``run`` on any machine with torch).
    """
    import glob

    import pyarrow.parquet as pq

    from torchrec.modules.embedding_configs import PoolingType

    from memcom_torchrec.models.embeddings import build_collection
    from memcom_torchrec.modules.assignment import frequency_assignment
    from memcom_torchrec.modules.dense_tables import dense_tables
    from memcom_torchrec.modules.mixed_dim_configs import frequency_slots
    from memcom_torchrec.modules.storage import table_storage
    from memcom_torchrec.modules.memcom_configs import FREQUENCY
    from memcom_torchrec.modules.methods import TableSpec, get_method, method_names

    manifest = json.load(open(os.path.join(data, "manifest.json")))
    n_items, n_users = manifest["num_items"], manifest["num_users"]
    if max(n_items, n_users) > torch.iinfo(torch.int16).max:
        raise ValueError(f"{data}: {n_items} items / {n_users} users do not fit the packed int16 ids")

    def split(name: str) -> Dict[str, torch.Tensor]:
        t = pq.read_table(sorted(glob.glob(os.path.join(data, name, "*.parquet"))))
        hist = torch.full((t.num_rows, HISTORY), -1, dtype=torch.int16)
        for r, h in enumerate(t.column("history").to_pylist()):
            h = h[-HISTORY:]
            if h:
                hist[r, : len(h)] = torch.tensor(h, dtype=torch.int16)
        d = {
            "user": torch.tensor(t.column("user").to_pylist(), dtype=torch.int32),
            "item": torch.tensor(t.column("item").to_pylist(), dtype=torch.int32),
            "history": hist,
        }
        if "exclude" in t.column_names:
            ex = t.column("exclude").to_pylist()
            d["exclude_lengths"] = torch.tensor([len(e) for e in ex], dtype=torch.int32)
            d["exclude_values"] = torch.tensor([i for e in ex for i in e], dtype=torch.int16)
        return d

    item = TableSpec("item", n_items, ["history"], PoolingType.MEAN)
    train = split("train")
    counts = torch.bincount(train["item"].long(), minlength=n_items)
    layouts, methods, baseline, skipped = {}, [], None, []
    for name in method_names():
        method = get_method(name)
        if method.warmup_method:  # its assignment comes from a trained warm-up, which the replica does not run
            skipped.append(name)
            continue
        if method.compresses:
            methods.append(name)
        else:
            baseline = name
        for r in RATIOS if method.compresses else [1.0]:
            if method.unreachable(n_items, DIM, r) is None:
                config = method.table_config(item, DIM, r)
                storage = table_storage(config)
                layouts[f"{name}@{r}"] = layout_of(storage)
                if storage.has("slots"):  # mixed-dimension: slots by training frequency, as the trainer sets them
                    layouts[f"{name}@{r}"]["slots"] = frequency_slots(counts).to(torch.int32)
                if storage.has("rows"):  # the variants' rows of U per entity: a second hash, or a frequency head
                    collection = build_collection([config], device="cpu")
                    if config.assignment == FREQUENCY:
                        collection.set_assignment("item", frequency_assignment(counts, config))
                    layouts[f"{name}@{r}"]["rows"] = dense_tables(collection, "item")["rows"].to(torch.int32)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    torch.save(
        {"num_items": n_items, "num_users": n_users, "layouts": layouts, "methods": methods, "baseline": baseline,
         "train": train, "valid": split("valid"), "test": split("test")},
        out,
    )
    print(f"packed {data} -> {out}; layouts {[(k, v['shapes']) for k, v in layouts.items()]}; "
          f"no replica for {skipped} (an assignment learned from a trained warm-up)")


# ---------------------------------------------------------------------------
# the replica model


class ItemTable(nn.Module):
    """Item embeddings of one layout (as ``pack`` stores it); ``forward(ids)`` -> ``ids.shape + (d,)``.

    Roles: ``weight`` (``n x d``, row ``i``), ``U`` (``m`` rows, row ``i mod m``), ``Q`` and ``R``
    (``Q[i // p] * R[i mod p]``, ``R`` initialised to 1), and ``w`` (times ``w[i]``, initialised to 1);
    ``U``, ``rows``, ``w``: ``sum_j w[i, j] U[rows[i, j]]`` (the MEmCom-family variants; ``rows``
    stored in the layout, ``w`` a flat ``n*k`` vector, element-wise Adagrad as the product's);
    ``A``, ``P``: ``P A[i]`` (low-rank; ``P`` of shape ``d x k``, trained with the dense layers);
    ``head``, ``tail``, ``P``, ``slots``: ``head[s]`` or ``P tail[s - h]`` (mixed-dimension, ``s = slots[i]``).
    """

    def __init__(self, layout: Dict, n: int) -> None:
        super().__init__()
        self.roles, self.n, shapes = frozenset(layout["roles"]), n, layout["shapes"]
        known = [{"weight"}, {"U"}, {"U", "w"}, {"Q", "R"}, {"Q", "R", "w"}, {"U", "rows", "w"}, {"A", "P"},
                 {"head", "tail", "P", "slots"}]
        if set(self.roles) not in known:
            raise ValueError(f"no replica for a table with tensors {sorted(self.roles)}")
        bound = math.sqrt(1.0 / n)  # TorchRec's default init for an n-row table
        table = next(r for r in ("weight", "U", "Q", "A", "head") if r in self.roles)
        if "tail" in self.roles:  # mixed-dimension: both blocks start as an n-row table would
            self.tail = nn.Parameter(torch.empty(*shapes["tail"]).uniform_(-bound, bound))
            self.register_buffer("slots", layout["slots"].long())
        if "P" in self.roles:  # low-rank: P A[i], P (d x k) uniform in +-sqrt(3/k) as the package's Projection
            k = shapes["P"][1]
            self.projection = nn.Parameter(torch.empty(*shapes["P"]).uniform_(-math.sqrt(3 / k), math.sqrt(3 / k)))
        self.size = shapes["U"][0] if "U" in self.roles else shapes["R"][0] if "R" in self.roles else n  # m or p
        if "R" in self.roles:  # R (p rows, init 1)
            self.remainder = nn.Parameter(torch.ones(*shapes["R"]))
        self.table = nn.Parameter(torch.empty(*shapes[table]).uniform_(-bound, bound))
        self.hashes = 1
        if "rows" in self.roles:
            self.register_buffer("rows", layout["rows"].long())
            self.hashes = int(self.rows.shape[1])
        if "w" in self.roles:
            self.w = nn.Parameter(torch.ones(n * self.hashes))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if "rows" in self.roles:
            k = self.hashes
            w = self.w[ids.unsqueeze(-1) * k + torch.arange(k, device=ids.device)]
            return (w.unsqueeze(-1) * self.table[self.rows[ids]]).sum(-2)
        if "A" in self.roles:
            return self.table[ids] @ self.projection.t()
        if "slots" in self.roles:  # head[s] if s < h, else P tail[s - h]
            s, h = self.slots[ids], self.table.shape[0]
            tail = self.tail[(s - h).clamp(min=0)] @ self.projection.t()
            return torch.where((s < h).unsqueeze(-1), self.table[s.clamp(max=h - 1)], tail)
        if "weight" in self.roles:
            v = self.table[ids]
        elif "U" in self.roles:
            v = self.table[ids % self.size]
        else:
            v = self.table[torch.div(ids, self.size, rounding_mode="floor")] * self.remainder[ids % self.size]
        if "w" in self.roles:
            v = v * self.w[ids].unsqueeze(-1)
        return v

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


class Replica(nn.Module):
    """The next-item model: mean-pooled history + user id -> ReLU MLP -> logits over every item."""

    def __init__(self, layout: Dict, n_items: int, n_users: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.items = ItemTable(layout, n_items)
        self.users = nn.Parameter(torch.empty(n_users, DIM).uniform_(-math.sqrt(1 / n_users), math.sqrt(1 / n_users)))
        layers: List[nn.Module] = [nn.Linear(2 * DIM, hidden), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        self.mlp = nn.Sequential(*layers)
        self.output = nn.Linear(hidden, n_items)

    def forward(self, user: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        mask = history >= 0
        v = self.items(history.clamp(min=0).long()) * mask.unsqueeze(-1)
        pooled = v.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)  # empty bag -> 0 (TorchRec MEAN)
        x = torch.cat([pooled, self.users[user.long()]], 1)
        return self.output(self.mlp(x))


class RowwiseAdagrad(torch.optim.Optimizer):
    """FBGEMM's row-wise Adagrad (state: mean squared gradient per row; 1-d params: plain Adagrad)."""

    def __init__(self, params, lr: float, eps: float = 1e-8) -> None:  # pyre-ignore
        super().__init__(params, dict(lr=lr, eps=eps))

    @torch.no_grad()
    def step(self) -> None:  # pyre-ignore
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if "sum" not in state:
                    state["sum"] = torch.zeros(p.shape[0], device=p.device)
                g2 = g * g if g.dim() == 1 else (g * g).mean(1)
                state["sum"].add_(g2)
                # A row no id touched has a zero gradient: its state and value stay put, as with
                # FBGEMM's sparse update.
                scale = group["lr"] / (state["sum"].sqrt() + group["eps"])
                p.sub_(g * (scale if g.dim() == 1 else scale.unsqueeze(1)))


@torch.no_grad()
def evaluate(
    model: Replica, split: Dict[str, torch.Tensor], n_items: int, k: int = 10, chunk: int = 2048
) -> Dict[str, float]:
    """Full-ranking nDCG@k / HR@k, ranks as ``memcom_torchrec.eval.metrics.target_ranks`` (ties and NaN included)."""
    model.eval()
    dev = split["user"].device
    lengths = split["exclude_lengths"].long()
    offsets = [0] + torch.cumsum(lengths, 0).tolist()  # row r's exclusions: values[offsets[r]:offsets[r + 1]]
    ndcg = hit = 0.0
    for s in range(0, split["user"].numel(), chunk):
        e = min(s + chunk, split["user"].numel())
        scores = model(split["user"][s:e], split["history"][s:e]).float()
        rows = torch.repeat_interleave(torch.arange(e - s, device=dev), lengths[s:e])
        vals = split["exclude_values"][offsets[s] : offsets[e]].long()
        excluded = torch.zeros_like(scores, dtype=torch.bool)
        excluded[rows, vals] = True
        target = split["item"][s:e].long()
        excluded[torch.arange(e - s, device=dev), target] = False
        ts = scores.gather(1, target.unsqueeze(1))
        above = ((scores >= ts) | scores.isnan() | ts.isnan()) & ~excluded  # the target counts itself once
        rank = above.sum(1).double()
        ok = rank <= k
        ndcg += float(torch.where(ok, 1.0 / torch.log2(rank + 1.0), torch.zeros_like(rank)).sum())
        hit += float(ok.sum())
    model.train()
    n = split["user"].numel()
    return {"ndcg": ndcg / n, "hr": hit / n}


def train_one(cfg: Dict, packed: Dict, device: torch.device) -> Dict:
    torch.manual_seed(cfg["seed"])
    n_items, n_users = packed["num_items"], packed["num_users"]
    cell = packed["layouts"][f"{cfg['method']}@{cfg['ratio']}"]
    model = Replica(cell, n_items, n_users, cfg["hidden"], cfg["dropout"]).to(device)
    # lowrank's projection is a dense layer in the package (Adam with the MLP), its rows A a table
    sparse = [p for name, p in model.items.named_parameters() if name != "projection"] + [model.users]
    dense = list(model.mlp.parameters()) + list(model.output.parameters()) + [
        p for name, p in model.items.named_parameters() if name == "projection"]
    opt_s = RowwiseAdagrad(sparse, lr=cfg["lr"])
    opt_d = torch.optim.Adam(dense, lr=1e-3)
    tr = {k: v.to(device) for k, v in packed["train"].items()}
    va = {k: v.to(device) for k, v in packed["valid"].items()}
    te = {k: v.to(device) for k, v in packed["test"].items()}
    n = tr["user"].numel()
    g = torch.Generator(device="cpu").manual_seed(cfg["seed"])
    best, best_epoch, bad, history = -1.0, 0, 0, []
    best_test = None
    t0 = time.time()
    for epoch in range(cfg["epochs"]):  # counted from 0, as the trainer does
        perm = torch.randperm(n, generator=g).to(device)
        for s in range(0, n, cfg["batch"]):
            idx = perm[s : s + cfg["batch"]]
            logits = model(tr["user"][idx], tr["history"][idx])
            loss = nn.functional.cross_entropy(logits, tr["item"][idx].long())
            opt_s.zero_grad(set_to_none=True)
            opt_d.zero_grad(set_to_none=True)
            loss.backward()
            opt_s.step()
            opt_d.step()
        v = evaluate(model, va, n_items)
        history.append(round(v["ndcg"], 5))
        if v["ndcg"] > best:
            best, best_epoch, bad = v["ndcg"], epoch, 0
            best_test = evaluate(model, te, n_items)
        else:
            bad += 1
            if bad >= cfg["patience"]:
                break
    return dict(cfg, valid_ndcg=best, test_ndcg=best_test["ndcg"], test_hr=best_test["hr"], best_epoch=best_epoch,
                epochs_run=epoch + 1, valid_curve=history, item_params=model.items.num_params(),
                item_ratio=n_items * DIM / model.items.num_params(), seconds=round(time.time() - t0, 1))


def _worker(queue, out: str, pack_path: str, deadline: float) -> None:
    """Takes runs off the queue until it is empty or the deadline passed; appends each result to ``out``."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(1)
    packed = torch.load(pack_path)
    while time.time() < deadline:
        try:
            cfg = queue.get(timeout=5)  # get_nowait() can miss items still in the feeder thread
        except Exception:
            return
        try:
            res = train_one(cfg, packed, device)
        except Exception as e:  # one failed run must not stop the worker
            print(json.dumps({"failed": cfg, "error": repr(e)}), flush=True)
            continue
        with open(out, "a") as f:
            f.write(json.dumps(res) + "\n")
        print(json.dumps({k: res[k] for k in ("method", "ratio", "lr", "dropout", "seed", "valid_ndcg", "test_ndcg", "best_epoch", "seconds")}), flush=True)


def grid(packed: Dict, lrs: List[float], dropouts: List[float], seeds: List[int]) -> List[Dict]:
    """Every packed cell x lr x dropout (the uncompressed baseline first, 16x next), then extra seeds at 16x."""
    base = dict(hidden=256, batch=512, epochs=12, patience=2)
    baseline, methods = packed["baseline"], packed["methods"]
    cells = [(baseline, 1.0, 0)] + [(m, r, 0) for r in [16.0, 4.0, 40.0, 8.0, 2.0] for m in methods]
    cells += [(m, 1.0 if m == baseline else 16.0, s) for s in seeds for m in [baseline] + methods]
    return [dict(base, method=m, ratio=r, lr=lr, dropout=dr, seed=seed)
            for m, r, seed in cells if f"{m}@{r}" in packed["layouts"]
            for dr, lr in itertools.product(dropouts, lrs)]


def run(args: argparse.Namespace) -> None:
    packed = torch.load(args.pack)
    cfgs = grid(packed, args.lrs, args.dropouts, args.seeds)
    if args.cells:
        cfgs = [c for c in cfgs if f"{c['method']}@{c['ratio']}" in args.cells]
    if args.limit:
        cfgs = cfgs[: args.limit]
    for c in cfgs:
        c["epochs"] = args.epochs
    print(f"{len(cfgs)} runs, {args.procs} processes, {args.budget_s}s budget", flush=True)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    for c in cfgs:
        queue.put(c)
    deadline = time.time() + args.budget_s
    procs = [ctx.Process(target=_worker, args=(queue, args.out, args.pack, deadline)) for _ in range(args.procs)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    left = 0
    while True:
        try:
            queue.get(timeout=1)
            left += 1
        except Exception:
            break
    if left:
        print(f"budget spent: {left} runs not started", flush=True)


def report(results: str, out: str) -> None:
    """Markdown: per (method, ratio) every tried config's valid nDCG@10, the choice on validation and its test."""
    rows = [json.loads(line) for line in open(results) if line.strip()]
    rows = [r for r in rows if r["seed"] == 0]
    cells: Dict = {}
    for r in rows:
        cells.setdefault((r["method"], r["ratio"]), []).append(r)
    # the uncompressed baseline is the one cell at ratio 1; methods in the order the grid ran them
    base_cell = next((c for c in cells if c[1] == 1.0), None)
    base = max(cells[base_cell], key=lambda r: r["valid_ndcg"])["test_ndcg"] if base_cell else None
    order = {m: i for i, m in enumerate(dict.fromkeys(r["method"] for r in rows))}
    lines = [
        "| method | ratio | item-table ratio | configs tried (lr/dropout: valid nDCG@10) | chosen on valid | valid | test nDCG@10 | test HR@10 | rel. loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (m, ratio), rs in sorted(cells.items(), key=lambda kv: (kv[0][1], order.get(kv[0][0], 99))):
        rs = sorted(rs, key=lambda r: (r["dropout"], r["lr"]))
        best = max(rs, key=lambda r: r["valid_ndcg"])
        tried = ", ".join(f"{r['lr']}/{r['dropout']}: {r['valid_ndcg']:.4f}" for r in rs)
        loss = f"{(base - best['test_ndcg']) / base:+.1%}" if base else ""
        lines.append(
            f"| {m} | {ratio:g}x | {best['item_ratio']:.2f} | {tried} | lr {best['lr']}, dropout {best['dropout']} "
            f"| {best['valid_ndcg']:.4f} | {best['test_ndcg']:.4f} | {best['test_hr']:.4f} | {loss} |"
        )
    text = "\n".join(lines) + "\n"
    with open(out, "w") as f:
        f.write(text)
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--data", default="data/ml-1m")
    p.add_argument("--out", default="sweep/ml1m.pt")
    r = sub.add_parser("run")
    r.add_argument("--pack", default="sweep/ml1m.pt")
    r.add_argument("--out", default="sweep/results.jsonl")
    r.add_argument("--procs", type=int, default=12)
    r.add_argument("--budget-s", type=float, default=480, help="no new run starts after this")
    r.add_argument("--lrs", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.2])
    r.add_argument("--dropouts", type=float, nargs="+", default=[0.0])
    r.add_argument("--seeds", type=int, nargs="*", default=[1, 2])
    r.add_argument("--epochs", type=int, default=12)
    r.add_argument("--limit", type=int, default=0)
    r.add_argument("--cells", nargs="*", default=[], help="only these method@ratio cells, e.g. memcom@16.0")
    q = sub.add_parser("report")
    q.add_argument("--results", default="docs/reference_sweep.jsonl")
    q.add_argument("--out", default="docs/reference_sweep_table.md")
    args = ap.parse_args()
    if args.cmd == "pack":
        pack(args.data, args.out)
    elif args.cmd == "run":
        run(args)
    else:
        report(args.results, args.out)


if __name__ == "__main__":
    main()
