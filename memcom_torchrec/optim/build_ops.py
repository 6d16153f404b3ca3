"""Compiles the package's C++ CPU ops (``csrc/``) into ``optim/_build/memcom_ops.so``.

Run by ``scripts/setup.sh`` (``python -m memcom_torchrec.optim.build_ops``). It uses
``torch.utils.cpp_extension`` (ninja, the installed torch's headers and ABI) with OpenMP. Without a
compiler it prints one line and exits 0: the package then trains ``w`` on the ATen fallback
(``memcom_torchrec.optim.fused_step``).
"""

import os
import sys

CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
BUILD_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build")
LIBRARY = os.path.join(BUILD_DIR, "memcom_ops.so")


def build(verbose: bool = False) -> str:
    """Compiles (or finds up to date) the ops library.

    Args:
        verbose (bool): show the compiler's commands.

    Returns:
        str: the library's path.

    Raises:
        RuntimeError: the compiler or ninja failed (the message says why).
    """
    from torch.utils import cpp_extension

    os.makedirs(BUILD_DIR, exist_ok=True)
    sources = sorted(os.path.join(CSRC, f) for f in os.listdir(CSRC) if f.endswith(".cpp"))
    cpp_extension.load(
        name="memcom_ops",
        sources=sources,
        build_directory=BUILD_DIR,
        extra_cflags=["-O3", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=verbose,
    )
    return LIBRARY


def main() -> int:
    try:
        path = build(verbose="--verbose" in sys.argv)
    except Exception as e:  # no compiler, no ninja: the fallback runs; say so in one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"memcom_torchrec: the fused w kernel was not built ({first}); training uses the ATen fallback",
              file=sys.stderr)
        return 0
    if "--verbose" in sys.argv:
        print(f"memcom_torchrec: built {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
