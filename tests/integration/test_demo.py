"""``personalign demo``: every chosen method answers each of the three preferences, timed, side by side;
Drift steers with the profiles shipped in the package (checked against the embedded SmolLM2 they were
fitted for, and skipped with the reason on another model); bad ``--methods`` fail on one line."""

from __future__ import annotations

import json

from personalign.cli.demo import PREFERENCES, demo_profile
from personalign.cli.main import main
from tests.conftest import STORIES


def _sections(out: str) -> dict[str, list[str]]:
    blocks: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        if line.startswith("=== "):
            current = line[4:].split(":")[0]
            blocks[current] = []
        elif current and line and not line.startswith(" "):
            blocks[current].append(line.split()[0])
        elif not line:
            current = None
    return blocks


def test_demo_on_another_model_skips_drift_saying_why(capsys, stories):
    rc = main(["demo", "--model", str(STORIES), "--prompt", "Once upon a time", "--max-new-tokens", "4",
               "--methods", "base,preference_prompting,amulet,drift"])
    out = capsys.readouterr().out
    assert rc == 0
    blocks = _sections(out)
    assert list(blocks) == list(PREFERENCES)
    for methods in blocks.values():
        assert methods == ["base", "preference_prompting", "amulet"]
    timing = out.split("time per method")[1]
    for m in ("base", "preference_prompting", "amulet"):
        assert f"  {m}" in timing and " s\n" in timing
    assert "drift" in timing and "skipped:" in timing and "fitted with steering model" in timing


def test_demo_methods_are_checked_before_loading(capsys):
    assert main(["demo", "--methods", "base,pad"]) == 2
    assert "`--methods`" in capsys.readouterr().err
    assert main(["demo", "--methods", "bse"]) == 2
    assert "base" in capsys.readouterr().err


def test_shipped_profiles_steer_the_embedded_model(capsys, smollm2):
    for name in PREFERENCES:
        prof = demo_profile(name)
        prof.check_model(smollm2.model, smollm2.tokenizer)  # fitted for this very model
        assert prof.num_pairs >= 8 and len(prof.selected()) == 3
        assert json.dumps(prof.to_dict())  # stored form
    rc = main(["demo", "--methods", "drift", "--max-new-tokens", "4"])
    out = capsys.readouterr().out
    assert rc == 0 and "skipped" not in out
    assert all(methods == ["drift"] for methods in _sections(out).values())
