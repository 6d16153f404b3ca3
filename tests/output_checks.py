"""What a command's output may not contain: third-party notices, warnings, errors, tracebacks."""

import re
from typing import List

# the generic forms of noise, and the known third-party texts by a fragment each
NOISE = re.compile(
    r"Warning: |WARNING|ERROR|Traceback \(most recent call last\)|\[cpuinfo_utils\.cpp|is_fx_tracing|"
    r"TopologyFactory|HeuristicalStorageReservation|TORCHREC_RESOLVED_POD_SIZE|\[Connection\]|planner\.stats|\[TBE=|LeafSpec|_C_mxfp8|Detected no triton|"
    r"torch\.distributed is disabled|Location '.*' is ignored"
)


def noise_lines(text: str) -> List[str]:
    """The lines of ``text`` that are noise (empty when the output is clean)."""
    return [line for line in text.splitlines() if NOISE.search(line)]
