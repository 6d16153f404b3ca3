#!/usr/bin/env bash
# Idempotent set-up: builds .venv in the repo root and installs the pinned stack.
#
#   bash scripts/setup.sh            # core + test tools
#   EXTRAS=export bash scripts/setup.sh   # also executorch (optional, heavy)
#
# fbgemm: the CUDA build (fbgemm-gpu) where `nvidia-smi` sees a GPU, otherwise
# the CPU build (fbgemm-gpu-cpu). torchrec's wheel requires the distribution
# `fbgemm-gpu`, so on CPU machines it is installed with --no-deps and its
# pure-Python requirements are listed here instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# pip, quiet. One message is filtered, by its exact text: a machine whose pip config lists local
# file mirrors (extra-index-url=file:///...) that hold only some projects gets one "Location ... is
# ignored: it is neither a file nor a directory." warning per project missing from a mirror; pip
# then takes the project from the next index, so the warning says nothing about this install.
pip() {
  { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2>&1 1>&3 \
      | { grep -Ev "^WARNING: Location 'file://[^']*' is ignored: it is neither a file nor a directory\.$" || true; } >&2
  } 3>&1
}
# every install below is held to the pinned stack (constraints.txt)
export PIP_CONSTRAINT="$PWD/constraints.txt"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  FBGEMM="fbgemm-gpu==1.8.0"
else
  FBGEMM="fbgemm-gpu-cpu==1.8.0"
fi

# Order matters for a quiet install: torchrec's wheel names `fbgemm-gpu` even where the CPU build
# `fbgemm-gpu-cpu` provides it, so torchrec goes in last, with --no-deps (pip checks no dependencies
# then), after everything it needs is in place; an install after it would print pip's resolver ERROR
# "torchrec 1.8.0 requires fbgemm-gpu, which is not installed".
pip install "torch==2.13.0"
pip install "$FBGEMM"
pip install -r requirements.txt
if [ "${EXTRAS:-}" = "export" ]; then
  pip install "executorch==1.4.1"
fi
pip install --no-deps "torchrec==1.8.0"
pip install --no-deps -e .
# The fused w op (C++, OpenMP): silent when built; without a compiler, one line says the ATen fallback runs.
"$VENV/bin/python" -m memcom_torchrec.optim.build_ops
"$VENV/bin/python" -c "import torch, fbgemm_gpu, torchrec, torchx, pyarrow; print('torch', torch.__version__, '| torchrec', torchrec.__version__ if hasattr(torchrec, '__version__') else '1.8.0', '| fbgemm ok')"
