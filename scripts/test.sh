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
  # One thread runs the engine's stock linears, two its tuned decode-step linears (views/linears.py),
  # so every equivalence test runs both ways; the full suite then runs the default (tuned on the CPU).
  for run in "1 off" "2 on"; do
    set -- $run
    echo "numerically sensitive tests, OMP_NUM_THREADS=$1, decode linears $2:"
    OMP_NUM_THREADS=$1 MKL_NUM_THREADS=$1 PERSONALIGN_DECODE_LINEARS=$2 python -m pytest -q \
      -m "numerics and not gpu and not slow" -p no:cacheprovider
  done
  set --
fi
python -m pytest -q "$@"
