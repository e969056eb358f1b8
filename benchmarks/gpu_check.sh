#!/usr/bin/env bash
# The first command to run on a GPU (issue 13), finishing within 8 minutes: GPU-only tests, the kernel tests
# natively, kernel timings against bf16 and torchao; one Markdown document on stdout and in --out FILE.
#   benchmarks/gpu_check.sh [--out gpu_check.md]
#   benchmarks/gpu_check.sh --dry-run [--static-args "--kernel quantize --config 0"]   # no GPU: plan + builds
# Everything is in benchmarks/gpu_check.py (its docstring says what runs and how it is timed).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
if [ -x .venv/bin/python ] && [ -z "${VIRTUAL_ENV:-}" ]; then PYTHON=.venv/bin/python; fi
unset TRITON_INTERPRET  # native kernels; the dry run compiles for GPUs without the interpreter
exec "$PYTHON" benchmarks/gpu_check.py "$@"
