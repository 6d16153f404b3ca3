"""``memcom-export``: a trained checkpoint -> ExecuTorch ``.pte`` (+ ``torch.export`` ``.pt2``).

Example::

    memcom-export --checkpoint runs/ml100k_memcom --out model.pte --dtype int8
"""

import argparse
import json
import sys
from dataclasses import asdict
from typing import List, Optional

from memcom_torchrec.export.lowering import BACKENDS, DEFAULT_MAX_BATCH, DEFAULT_MAX_HISTORY, XNNPACK
from memcom_torchrec.export.slim import DTYPES, FP32
from memcom_torchrec.quiet import add_verbose_flag, configure_cli


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="memcom-export", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="run directory, checkpoint root or checkpoint directory")
    p.add_argument("--out", required=True, help="path of the .pte to write")
    p.add_argument("--dtype", choices=DTYPES, default=FP32,
                   help="fp32; int8 / int4 / int4_row: every weight matrix (tables and linear layers) weight-only, "
                        "asymmetric: int8 one scale per row, int4 one per 32 columns where the width allows, "
                        "int4_row one per row "
                        "(ExecuTorch's embedding_byte / embedding_4bit kernels); activations float; w and biases fp16")
    p.add_argument("--backend", choices=BACKENDS, default=XNNPACK,
                   help="xnnpack: delegate what XNNPACK supports; portable: portable kernels only")
    p.add_argument("--pt2", default="", help="path of the torch.export program (default: --out with .pt2)")
    p.add_argument("--no-pt2", action="store_true", help="do not write the torch.export program")
    p.add_argument("--max-batch", type=int, default=None,
                   help=f"largest batch accepted (default {DEFAULT_MAX_BATCH}; 32 for the mlp scorer, whose working "
                        "memory grows with batch x items)")
    p.add_argument("--max-history", type=int, default=DEFAULT_MAX_HISTORY,
                   help="history ids per row the memory plan allows (max_batch * this in all)")
    add_verbose_flag(p)
    return p.parse_args(argv)


def cli_error(prog: str, e: Exception) -> int:
    """Prints ``e`` as one line for the command ``prog`` (an ImportError with the extra to install); returns 2."""
    hint = "; install the extra: pip install 'memcom_torchrec[export]'" if isinstance(e, ImportError) else ""
    print(f"{prog}: {e}{hint}", file=sys.stderr)
    return 2


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    configure_cli(args.verbose)
    try:
        from memcom_torchrec.export.lowering import export_checkpoint

        result = export_checkpoint(
            args.checkpoint,
            args.out,
            dtype=args.dtype,
            backend=args.backend,
            pt2=None if args.no_pt2 else args.pt2,
            max_batch=args.max_batch,
            max_history=args.max_history,
        )
    except (ImportError, ValueError) as e:
        return cli_error("memcom-export", e)
    print(json.dumps(asdict(result), indent=2))
    print(
        f"wrote {result.pte} ({result.pte_bytes / 1e6:.3f} MB, {result.kind}, {result.dtype}, {result.backend}; "
        f"embedding tables {result.embedding_bytes / 1e3:.0f} KB, linear layers {result.dense_bytes / 1e3:.0f} KB); parity of the .pte with the eager model over batches of 1, 4 and 37: "
        f"max |diff| = {result.parity_max_abs_diff:.2e}",
        file=sys.stderr,
    )
    if not result.parity_max_abs_diff <= 1e-4:
        print("memcom-export: parity check FAILED", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
