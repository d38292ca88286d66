#!/usr/bin/env bash
# The one command a lent GPU machine runs (issue 18): the cuDNN parity tests, then
# benchmarks/train.py on the GPU, in at most ten minutes. That image has JAX with CUDA,
# flax, optax, orbax, torch, transformers and pytest but not pydantic, which travels as
# wheels in .whl/ (pydantic, pydantic-core, annotated-types, typing-inspection for Python
# 3.12; /work/.library/device/README.md says how to fetch them), e.g.:
#   run(command="bash benchmarks/gpu.sh", carry=[".whl"], timeout_s=600)
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 150 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_attention.py
timeout 420 python3 benchmarks/train.py --platform gpu
