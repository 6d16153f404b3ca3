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
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
# every install below is held to the pinned stack (constraints.txt)
export PIP_CONSTRAINT="$PWD/constraints.txt"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  FBGEMM="fbgemm-gpu==1.8.0"
else
  FBGEMM="fbgemm-gpu-cpu==1.8.0"
fi

pip install "torch==2.13.0"
pip install "$FBGEMM"
pip install --no-deps "torchrec==1.8.0"
pip install -r requirements.txt
pip install --no-deps -e .
if [ "${EXTRAS:-}" = "export" ]; then
  pip install "executorch==1.4.1"
fi
"$VENV/bin/python" -c "import torch, fbgemm_gpu, torchrec, torchx, pyarrow; print('torch', torch.__version__, '| torchrec', torchrec.__version__ if hasattr(torchrec, '__version__') else '1.8.0', '| fbgemm ok')"
