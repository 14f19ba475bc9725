"""``unfold_pairs``: an item's own rows, and the rows an earlier release folded under the pair's id alone."""

from __future__ import annotations

import torch

from personalign.personas.attributes import default_pool
from personalign.personas.drift import DriftProfile
from personalign.server.folding import feedback_pairs, item_pair_id, unfold_pairs
from personalign.server.store import StoredFeedback


def test_own_rows_and_an_earlier_releases_rows():
    pool = default_pool()
    fb = StoredFeedback("f1", "u", [{"role": "user", "content": "hi"}], "yes", "no", None, True, 1.0)
    pair = feedback_pairs(fb)[0]
    prof = DriftProfile.empty({"name": "tiny"}, pool)
    row = torch.ones(len(pool))
    prof.add_rewards(item_pair_id("f1", pair), row, row)
    prof.add_rewards(item_pair_id("f2", pair), row, row)  # the same pair, folded by another item
    prof.add_rewards(pair.pair_id, row, row)  # folded by an earlier release
    out = DriftProfile.from_dict(unfold_pairs(prof.to_dict(), fb))
    assert out.pair_ids == [item_pair_id("f2", pair), pair.pair_id]  # exactly its own row went
    assert unfold_pairs(out.to_dict(), fb) is None  # nothing of its own left
    legacy = DriftProfile.from_dict(unfold_pairs(out.to_dict(), fb, True))
    assert legacy.pair_ids == [item_pair_id("f2", pair)]
