"""``scripts/tolerance_mutations.py`` stays runnable: every defect it plants names code that exists
exactly once and tests that exist (a refactor that moves the code must move the mutation with it)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_mutation_anchor_and_test_exists():
    spec = importlib.util.spec_from_file_location("tolerance_mutations", ROOT / "scripts" / "tolerance_mutations.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # defines MUTS; runs nothing
    assert len(mod.MUTS) >= 10
    for name, path, old, new, tests in mod.MUTS:
        assert (ROOT / path).read_text().count(old) == 1, name
        assert old != new, name
        for t in tests:
            file, _, func = t.partition("::")
            text = (ROOT / file).read_text()
            assert not func or f"def {func.split('[')[0]}(" in text, (name, t)
