#!/usr/bin/env bash
# Fit the Drift profiles that `personalign demo` ships (src/personalign/personas/demo_profiles/), for the
# embedded SmolLM2-135M-Instruct, from public data only:
#  1. P-SOUPS-style pairs (Jang et al. 2023; seed 001 Table 7): SmolLM2 answers the first 20 HelpSteer
#     training prompts (CC-BY-4.0, ../shared/data/prompts/HelpSteer_train.json) under each of the six
#     P-SOUPS preferences (greedy, 48 tokens); for preference X the answer under X is chosen and the
#     answer under X's opposite is rejected;
#  2. one profile per demo preference (P1A elementary, P2A concise, P3A friendly) on its first 8 pairs,
#     over the 12-attribute pool of benchmarks/psoups_drift_attributes.json, top_m = 3 — the protocol
#     of the CPU quality benchmark (docs/results.md).
# About 10 minutes on 2 CPU cores. Run from the repository root with the project's .venv active.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/demo_profiles}
DEST=src/personalign/personas/demo_profiles
mkdir -p "$OUT" "$DEST"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} python benchmarks/psoups_pairs.py --model smollm2 --n-prompts 20 \
    --max-new-tokens 48 --batch-size 120 --out "$OUT"
for pair in P1A:elementary P2A:concise P3A:friendly; do
  id=${pair%%:*}; name=${pair##*:}
  head -n 8 "$OUT/pairs_$id.jsonl" > "$OUT/pairs_${id}_8.jsonl"
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} personalign fit drift --model smollm2 --pairs "$OUT/pairs_${id}_8.jsonl" \
      --attributes benchmarks/psoups_drift_attributes.json --top-m 3 --max-response-tokens 32 \
      --out "$DEST/$name.json"
done
