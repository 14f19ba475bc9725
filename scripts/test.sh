#!/usr/bin/env bash
# Set up, lint, and run the default test suite (CPU, offline; excludes `gpu` and `slow` markers).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check src tests scripts benchmarks
if [ $# -eq 0 ]; then
  # The float32 comparisons under one and two threads: the CPU's matmul kernels, and so the order in
  # which they sum, change with the thread count (tests/numerics.py says what each tolerance covers).
  for threads in 1 2; do
    echo "numerically sensitive tests, OMP_NUM_THREADS=$threads:"
    OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads python -m pytest -q -m "numerics and not gpu and not slow" \
      -p no:cacheprovider
  done
fi
python -m pytest -q "$@"
