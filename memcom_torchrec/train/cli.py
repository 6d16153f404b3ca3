"""Command line of a training run: every ``TrainConfig`` field is a flag."""

import argparse
import dataclasses
import os
import sys
from typing import List, Optional, Tuple

from memcom_torchrec.modules.methods import get_method
from memcom_torchrec.quiet import add_verbose_flag, configure_cli
from memcom_torchrec.train.distributed_env import end_process, shutdown_distributed
from memcom_torchrec.train.trainer import TrainConfig, train


def config_parser(cls: type = TrainConfig, description: str = "") -> argparse.ArgumentParser:
    """An argparse parser with one ``--flag`` per dataclass field (lists as space-separated values)."""
    parser = argparse.ArgumentParser(description=description or cls.__doc__.splitlines()[0])
    for f in dataclasses.fields(cls):
        # the field's declared default, not an instance's (__post_init__ may resolve some, e.g. the scorer)
        value = f.default_factory() if f.default is dataclasses.MISSING else f.default
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=value)
        elif isinstance(value, list):
            kind = type(value[0]) if value else str
            parser.add_argument(flag, type=kind, nargs="*", default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value)
    return parser


def _parse(argv: Optional[List[str]]) -> Tuple[TrainConfig, bool]:
    """(config, ``--verbose``) of a command line; a bad model kind or method is a usage error (exit 2)."""
    parser = config_parser(TrainConfig, "Train a next-item model with MEmCom (or baseline) embeddings.")
    add_verbose_flag(parser)
    args = vars(parser.parse_args(argv))
    verbose = args.pop("verbose")
    try:
        cfg = TrainConfig(**args)
        get_method(cfg.method)
    except ValueError as e:
        parser.error(str(e))
    return cfg, verbose


def parse_config(argv: Optional[List[str]] = None) -> TrainConfig:
    """The ``TrainConfig`` of a command line; a bad model kind or method is a usage error (exit 2)."""
    return _parse(argv)[0]


def main(argv: Optional[List[str]] = None) -> None:
    """Trains one run, then ends the process (``end_process``): this is the process's entry point.

    Logs: this package's INFO lines (epochs, results); libraries' INFO lines (torchrec's planner
    tables, FBGEMM's kernel arguments) and the known third-party notices only with ``--verbose``.
    """
    cfg, verbose = _parse(argv)
    configure_cli(verbose, own_info=True)
    try:
        train(cfg)
    except ValueError as e:  # bad input (data, checkpoint, ids): every rank raises it; one line, from rank 0
        if os.environ.get("RANK", "0") == "0":
            print(f"memcom-train: error: {e}", file=sys.stderr)
        end_process(2)
    shutdown_distributed()  # only after success: after a failure a peer may be stuck in a collective
    end_process(0)


if __name__ == "__main__":
    main()
