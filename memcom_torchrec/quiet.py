"""Known third-party messages, silenced by their exact text, so a command's own output stands out.

Every CLI of the package calls ``quiet_third_party(args.verbose)`` first. It installs
``warnings`` filters and ``logging`` filters that drop only the messages listed here (each a
deprecation or environment notice of a library this package pins, none about this package's
inputs or results). ``--verbose`` (or ``MEMCOM_VERBOSE=1``, which ``--verbose`` exports to the
processes a command starts) shows them again. Torch-free: stdlib only.
"""

import contextlib
import logging
import os
import re
import sys
import tempfile
import warnings
from typing import Dict, Iterator, List, Pattern, Set, Tuple, Type

VERBOSE_ENV = "MEMCOM_VERBOSE"

# (category, message pattern matched at the start of the warning's text)
KNOWN_WARNINGS: List[Tuple[Type[Warning], str]] = [
    # torch.utils._pytree: torch.export's own pickling of tree specs (every export)
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    # torch.distributed.checkpoint loading a checkpoint in a process without a process group (export)
    (UserWarning, r"torch\.distributed is disabled, unavailable or uninitialized, assuming the intent is to "
                  r"(load|save) in a single process"),
    # torchrec's planner and DMP (every training run)
    (FutureWarning, r"HeuristicalStorageReservation is known to cause issues"),
    (FutureWarning, r"`broadcast_buffers` is deprecated\. Use `forward_sync_buffers` instead"),
    # torch.distributed.checkpoint saving torchrec's ShardedTensor state (every checkpoint)
    (FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor\."),
    # torch renamed these collectives; callers inside torch and torchrec still use the old names (2 ranks)
    (FutureWarning, r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated\. "
                    r"Please use `torch\.distributed\.(reduce_scatter_single|all_gather_single)` instead\."),
]

# logger name -> patterns of its records' messages (matched at the start)
KNOWN_LOG_RECORDS: Dict[str, List[str]] = {
    # torchao's CUDA-only extensions and Triton kernels, absent from a CPU install
    "torchao": [r"Failed to load \S*/torchao/_C_(mxfp8|cutlass_90a)\S*\.so: Could not load this library"],
    "torchao.kernel.intmm": [r"Warning: Detected no triton, on systems without Triton certain kernels will not work"],
    # torchao registers one of its enums with torch's pytree (deprecated by torch, torchao's to change)
    "torch.utils._pytree": [r"<enum 'KernelPreference'> is an Enum subclass and is now natively supported"],
    # torchrec's KJT checks call torch.fx's is_fx_tracing (once per process)
    "torch.fx._symbolic_trace": [r"is_fx_tracing will return true for both fx\.symbolic_trace and torch\.export"],
    # torchrec's planner, given an explicit CPU / GPU topology by the trainer
    "torchrec.distributed.planner.types": [
        r"The topology was constructed directly rather than via TopologyFactory\.create_topology\(\)"],
    "torchrec.distributed.planner.storage_reservations": [
        r"There is a known issue with TorchRec's dense tensor size calculation in dry run scenarios"],
    # torchrec's intra-/cross-node groups (table-wise-row-wise plans) without a pod size set
    "torchrec.distributed.comm": [r"TORCHREC_RESOLVED_POD_SIZE not set, utilizing LOCAL_WORLD_SIZE instead\.",
                                  r"\[Connection\] (intra|cross)_group: \[\d+\] -> \[\["],
}

# Lines the C++ side of a library writes to the process's stderr (no Python logger to filter):
# ExecuTorch's thread pool probing the CPU on its first execution, on x86 (ARM's midr files).
KNOWN_NATIVE_LINES: List[str] = [
    r"\[cpuinfo_utils\.cpp:\d+\] Reading file /sys/devices/soc0/image_version$",
    r"\[cpuinfo_utils\.cpp:\d+\] Failed to open midr file /sys/devices/soc0/image_version$",
    r"\[cpuinfo_utils\.cpp:\d+\] Reading file /sys/devices/system/cpu/cpu\d+/regs/identification/midr_el1$",
    r"\[cpuinfo_utils\.cpp:\d+\] Failed to open midr file /sys/devices/system/cpu/cpu\d+/regs/identification/midr_el1$",
    r"\[cpuinfo_utils\.cpp:\d+\] CPU info and manual query on # of cpus dont match\.$",
]
_NATIVE: List[Pattern[str]] = [re.compile(p) for p in KNOWN_NATIVE_LINES]
_NATIVE_DONE: Set[str] = set()


def is_verbose() -> bool:
    """Whether third-party messages are shown (``--verbose`` here or in the command that started us)."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


class _KnownMessages(logging.Filter):
    """Drops a logger's records whose message matches one of ``patterns``."""

    def __init__(self, patterns: List[str]) -> None:
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.match(message) for p in self.patterns)


def quiet_third_party(verbose: bool = False) -> None:
    """Silences the known third-party messages above, unless ``verbose`` (or ``MEMCOM_VERBOSE=1``).

    Args:
        verbose: show everything; also exported as ``MEMCOM_VERBOSE=1`` to child processes.
    """
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    if is_verbose():
        return
    for category, pattern in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    for name, patterns in KNOWN_LOG_RECORDS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _KnownMessages) for f in logger.filters):
            logger.addFilter(_KnownMessages(patterns))


def configure_cli(verbose: bool, own_info: bool = False, stream=None) -> None:  # pyre-ignore[2]
    """A CLI's output set-up: the known notices silenced (``quiet_third_party``), logs at WARNING
    (INFO with ``--verbose``).

    Args:
        verbose: show everything (libraries' INFO logs and the known notices).
        own_info: this package's INFO lines (the trainer's epochs and results) in any case.
        stream: where logs go (default stderr).
    """
    quiet_third_party(verbose)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=stream or sys.stderr,
                        force=True)
    if own_info:
        logging.getLogger("memcom_torchrec").setLevel(logging.INFO)


def add_verbose_flag(parser) -> None:  # pyre-ignore[2]: argparse.ArgumentParser
    """Adds ``-v/--verbose`` (third-party messages and libraries' INFO logs shown) to a CLI's parser."""
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also show third-party notices and libraries' INFO logs (hidden by default)")


@contextlib.contextmanager
def native_stderr_filtered(key: str) -> Iterator[None]:
    """The first time per process for ``key``: runs the block with file descriptor 2 captured, then
    writes back every line that is not one of ``KNOWN_NATIVE_LINES``. Later calls run the block as is.

    Args:
        key: which one-time native initialisation the block may trigger (e.g. ``"executorch-load"``).
    """
    if key in _NATIVE_DONE or is_verbose():
        yield
        return
    _NATIVE_DONE.add(key)
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                if not any(p.match(line.rstrip("\n")) for p in _NATIVE):
                    sys.stderr.write(line)
            sys.stderr.flush()
