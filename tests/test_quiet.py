"""Known third-party notices are dropped by their exact text; anything else, and --verbose, still shows."""

import logging
import os
import subprocess
import sys
import warnings

import pytest

from memcom_torchrec import quiet
from output_checks import noise_lines


def _take_filters() -> dict:
    """Removes the known-message filters from their loggers; returns them by logger name."""
    taken = {}
    for name in quiet.KNOWN_LOG_RECORDS:
        logger = logging.getLogger(name)
        taken[name] = [f for f in logger.filters if isinstance(f, quiet._KnownMessages)]
        for f in taken[name]:
            logger.removeFilter(f)
    return taken


@pytest.fixture
def restore_verbose():
    """Each test starts from loggers without the filters (an in-process CLI test may have installed
    them: they are per logger, for the process) and leaves the loggers and environment as they were."""
    before = os.environ.pop(quiet.VERBOSE_ENV, None)
    taken = _take_filters()
    yield
    os.environ.pop(quiet.VERBOSE_ENV, None)  # --verbose exports it: no later test may inherit it
    if before is not None:
        os.environ[quiet.VERBOSE_ENV] = before
    _take_filters()
    for name, filters in taken.items():
        for f in filters:
            logging.getLogger(name).addFilter(f)


def test_known_warnings_are_dropped_and_others_kept(restore_verbose):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet.quiet_third_party()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
        warnings.warn("HeuristicalStorageReservation is known to cause issues, particularly ...", FutureWarning)
        warnings.warn("torch.distributed is disabled, unavailable or uninitialized, assuming the intent is to "
                      "load in a single process.", UserWarning)
        warnings.warn("HeuristicalStorageReservation is known to cause issues", UserWarning)  # other category
        warnings.warn("something else is deprecated", FutureWarning)
    assert [str(w.message) for w in seen] == [
        "HeuristicalStorageReservation is known to cause issues", "something else is deprecated"]


def test_known_log_records_are_dropped_and_others_kept(restore_verbose, caplog):
    quiet.quiet_third_party()
    quiet.quiet_third_party()  # idempotent: one filter per logger
    assert sum(isinstance(f, quiet._KnownMessages) for f in logging.getLogger("torchao").filters) == 1
    with caplog.at_level(logging.WARNING):
        logging.getLogger("torchao").warning(
            "Failed to load /x/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: Could not load this "
            "library: /x")
        logging.getLogger("torchao").warning("Failed to load /x/site-packages/torchao/_C_other.so: ...")
        logging.getLogger("torch.fx._symbolic_trace").warning(
            "is_fx_tracing will return true for both fx.symbolic_trace and torch.export. Please use ...")
        logging.getLogger("torchrec.distributed.planner.types").warning("a planner message of another kind")
    assert [r.getMessage() for r in caplog.records] == [
        "Failed to load /x/site-packages/torchao/_C_other.so: ...", "a planner message of another kind"]


def test_verbose_keeps_everything_and_reaches_child_processes(restore_verbose):
    quiet.quiet_third_party(verbose=True)
    assert os.environ[quiet.VERBOSE_ENV] == "1"  # exported: the processes a command starts show them too
    assert not logging.getLogger("torchao").filters
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet.quiet_third_party()  # a later call in the same process keeps verbose
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning)
    assert len(seen) == 1


NATIVE = r"""
import os, sys
from memcom_torchrec.quiet import native_stderr_filtered
for _ in range(2):
    with native_stderr_filtered("probe"):
        os.write(2, b"[cpuinfo_utils.cpp:71] Reading file /sys/devices/soc0/image_version\n")
        os.write(2, b"[cpuinfo_utils.cpp:125] CPU info and manual query on # of cpus dont match.\n")
        os.write(2, b"[cpuinfo_utils.cpp:125] something the library has not said before\n")
        print("python's own stderr", file=sys.stderr)
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_native_lines_are_dropped_on_the_first_call_only(verbose):
    env = dict(os.environ)
    env.pop(quiet.VERBOSE_ENV, None)
    if verbose:
        env[quiet.VERBOSE_ENV] = "1"
    err = subprocess.run([sys.executable, "-c", NATIVE], env=env, capture_output=True, text=True, timeout=60,
                         check=True).stderr.splitlines()
    known = "[cpuinfo_utils.cpp:71] Reading file /sys/devices/soc0/image_version"
    assert err.count("[cpuinfo_utils.cpp:125] something the library has not said before") == 2
    assert err.count("python's own stderr") == 2
    # the first block filtered (unless verbose), the second one not: the filter is for a one-time start-up
    assert err.count(known) == (2 if verbose else 1)


def test_noise_check_sees_each_form():
    """tests/output_checks.py, used on the CLIs' real output by the pareto and launch tests."""
    assert noise_lines("epoch 0: loss 1\n| a | b |") == []
    for line in ("/x/planners.py:552: FutureWarning: HeuristicalStorageReservation is known",
                 "WARNING:torchao:Failed to load /x/_C_mxfp8.so", "[cpuinfo_utils.cpp:71] Reading file /sys/x",
                 "ERROR: pip's dependency resolver does not currently take into account",
                 "Traceback (most recent call last):", "INFO torchrec.distributed.planner.stats: ####"):
        assert noise_lines(line) == [line]
