"""The reward that guides ``args`` in the CPU quality benchmark (benchmarks/quality_cpu.yaml).

No trained reward model separates the six P-SOUPS preferences on SmolLM2's answers (docs/results.md:
the PersRM, a linear head and a LoRA reward model stay near chance on held-out prompts), so ARGS is
guided by each preference's own target metric, in that metric's units and signed toward the target:

    P1A  -reading grade          P2A  -words          P3A  sentiment - P(offensive)
    P1B  +reading grade          P2B  +words          P3B  P(offensive) - sentiment

This is the ARGS paper's own protocol (the reward model that guides the search also scores the
result), so ARGS's numbers on the target metrics are an upper reference, not a comparison with
methods that never see the metric; its diversity and judged win rate are comparable.

Use:  --reward-function benchmarks/psoups_target_reward.py:target_reward
The preference texts are read from ``psoups_preferences.json`` of the shared data
(``$PERSONALIGN_SHARED``, else ``../shared`` of the working directory).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from personalign.eval.metrics import flesch_kincaid_grade, offensiveness, sentiment, word_count

# the sign of each metric in the reward of each preference (the `targets` of quality_cpu.yaml)
TARGETS = {
    "P1A": {"reading_grade": -1.0},
    "P1B": {"reading_grade": 1.0},
    "P2A": {"length": -1.0},
    "P2B": {"length": 1.0},
    "P3A": {"sentiment": 1.0, "offensiveness": -1.0},
    "P3B": {"sentiment": -1.0, "offensiveness": 1.0},
}

METRIC = {
    "reading_grade": flesch_kincaid_grade,
    "length": lambda text: float(word_count(text)),
    "sentiment": lambda text: sentiment([text])[0],
    "offensiveness": lambda text: offensiveness([text])[0],
}


@functools.cache
def preference_ids() -> dict[str, str]:
    """Preference text -> P-SOUPS id, from the shared data."""
    shared = Path(os.environ.get("PERSONALIGN_SHARED") or Path.cwd().parent / "shared")
    path = shared / "data" / "prompts" / "psoups_preferences.json"
    if not path.is_file():
        raise ValueError(f"psoups_target_reward: no {path}; set PERSONALIGN_SHARED to the shared data directory.")
    prefs = json.loads(path.read_text())["preferences"]
    return {text: pid for pid, text in prefs.items()}


def target_reward(prompt: str, response: str, preference: str) -> float:
    """The P-SOUPS preference's target metric(s) of ``response``, signed toward the target."""
    pid = preference_ids().get(preference)
    if pid is None:
        raise ValueError(f"psoups_target_reward: {preference!r} is not one of the six P-SOUPS preferences.")
    return sum(sign * METRIC[m](response) for m, sign in TARGETS[pid].items())
