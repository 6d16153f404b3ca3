#!/usr/bin/env python
"""Generate synthetic interactions (planted low-rank model, Zipf-like popularity). Same as `memcom-data synth`.

    python datasets/synth.py --users 1000000 --items 2000000 --interactions 20000000 --out data/synth-20m
"""

import sys

from memcom_torchrec.data.cli import main

if __name__ == "__main__":
    sys.exit(main(["synth", *sys.argv[1:]]))
