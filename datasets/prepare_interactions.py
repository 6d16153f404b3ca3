#!/usr/bin/env python
"""Prepare your own interaction log (CSV/TSV/Parquet). Same as `memcom-data prepare --from`.

    python datasets/prepare_interactions.py log.csv user_id item_id ts data/mine [--string-ids]
"""

import argparse
import logging

from memcom_torchrec.data.cli import summary
from memcom_torchrec.data.prepare import prepare_interactions

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path")
    p.add_argument("user_col")
    p.add_argument("item_col")
    p.add_argument("time_col")
    p.add_argument("out")
    p.add_argument("--history-len", type=int, default=50)
    p.add_argument("--string-ids", action="store_true")
    p.add_argument("--sha256", default=None)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    m = prepare_interactions(a.path, a.user_col, a.item_col, a.time_col, a.out,
                             history_len=a.history_len, string_ids=a.string_ids, sha256=a.sha256)
    print(summary(m, a.out))
