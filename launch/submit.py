"""``torchx run`` that refuses unknown scheduler options.

TorchX 0.7.0 silently ignores ``-cfg`` keys its scheduler does not know, so a
typo (``-cfg partiton=gpu``) submits to the default partition. This wrapper
checks every ``-cfg``/``--scheduler_args`` key against the scheduler's run
options (``torchx runopts SCHEDULER``) and then hands the arguments, unchanged,
to ``torchx run``::

    python launch/submit.py -s slurm -cfg partition=gpu,time=2:00:00 \\
        launch/components.py:train --j 2x8 --gpu 8 --data_dir data/ml-1m -- --epochs 12
"""

import argparse
import difflib
import re
import sys
from typing import List, Optional

from torchx.schedulers import get_default_scheduler_name, get_scheduler_factories

_KEY = re.compile(r"(?:^|[,;])\s*([^,;=\s]+)\s*=")


def scheduler_option_names(scheduler: str) -> List[str]:
    """Run-option names of a TorchX scheduler (what ``-cfg`` accepts)."""
    opts = get_scheduler_factories()[scheduler](session_name="submit").run_opts()
    return sorted(name for name, _ in opts)


def check_scheduler_args(scheduler: str, cfg: Optional[str]) -> None:
    """Raises ``ValueError`` naming an unknown ``-cfg`` key and the keys the scheduler knows."""
    if not cfg:
        return
    known = scheduler_option_names(scheduler)
    keys = _KEY.findall(cfg)
    if not keys:
        raise ValueError(f"-cfg {cfg!r}: expected key=value pairs separated by ',' or ';'")
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(
                f"-cfg {key}=...: scheduler '{scheduler}' has no option '{key}'; {hint}"
                f"its options: {', '.join(known)} (see `torchx runopts {scheduler}`)"
            )


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # only the two options checked here; `torchx run` parses everything again
    parser = argparse.ArgumentParser(prog="launch/submit.py", description=__doc__.splitlines()[0], add_help=False)
    parser.add_argument("-s", "--scheduler", default=get_default_scheduler_name(),
                        choices=list(get_scheduler_factories()))
    parser.add_argument("-cfg", "--scheduler_args")
    args, _ = parser.parse_known_args(argv)
    try:
        check_scheduler_args(args.scheduler, args.scheduler_args)
    except ValueError as e:
        print(f"launch/submit.py: error: {e}", file=sys.stderr)
        return 2
    from torchx.cli.main import main as torchx_main

    torchx_main(["run", *argv])
    return 0


if __name__ == "__main__":
    sys.exit(main())
