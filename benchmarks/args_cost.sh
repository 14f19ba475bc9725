#!/usr/bin/env bash
# per-step cost of args (k = 10, PersRM text reward) on the benchmark's first 5 prompts, preference P1A
# Run from the repository root after the PersRM of docs/results.md exists:  PERSONALIGN_SHARED=/path/to/shared OMP_NUM_THREADS=2 bash benchmarks/args_cost.sh
# Per-step cost = (wall(4 tokens) - wall(1 token)) / 3 (model and PersRM loading cancel).
P=$(python3 -c "import json;print(json.load(open('$PERSONALIGN_SHARED/data/prompts/psoups_preferences.json'))['preferences']['P1A'])")
mapfile -t Q < <(python3 -c "import json;[print(r['prompt']) for r in json.load(open('$PERSONALIGN_SHARED/data/prompts/koala_eval_50.json'))[:5]]")
for N in 1 4; do
  s=$(date +%s.%N)
  PYTHONPATH=src nice -n 10 python -m personalign generate --model smollm2 --method args --persrm runs/psoups/persrm \
    --param k=10 --preference "$P" --max-new-tokens $N --prompt "${Q[0]}" --prompt "${Q[1]}" --prompt "${Q[2]}" --prompt "${Q[3]}" --prompt "${Q[4]}" > /dev/null 2>&1 || { echo "generate failed"; exit 1; }
  echo "max_new_tokens=$N wall_s=$(python3 -c "print(round($(date +%s.%N)-$s,1))")"
done
