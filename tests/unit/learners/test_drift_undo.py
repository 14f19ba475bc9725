"""The Drift learner's ``undo``: an item's own rows, and the rows an earlier release folded under the
pair's id alone (taken back only when no other folded item states the pair)."""

from __future__ import annotations

import torch

from personalign.learners.drift import DriftLearner, item_pair_id, unfold
from personalign.personas.attributes import default_pool
from personalign.personas.drift import DriftProfile
from personalign.server.store import StoredFeedback


def _item(fid: str) -> StoredFeedback:
    return StoredFeedback(fid, "u", [{"role": "user", "content": "hi"}], "yes", "no", None, True, 1.0)


def test_own_rows_and_an_earlier_releases_rows():
    pool = default_pool()
    fb = _item("f1")
    pair = fb.pairs()[0]
    prof = DriftProfile.empty({"name": "tiny"}, pool)
    row = torch.ones(len(pool))
    prof.add_rewards(item_pair_id("f1", pair), row, row)
    prof.add_rewards(item_pair_id("f2", pair), row, row)  # the same pair, folded by another item
    prof.add_rewards(pair.pair_id, row, row)  # folded by an earlier release
    out = DriftProfile.from_dict(unfold(prof.to_dict(), fb))
    assert out.pair_ids == [item_pair_id("f2", pair), pair.pair_id]  # exactly its own row went
    assert unfold(out.to_dict(), fb) is None  # nothing of its own left
    legacy = DriftProfile.from_dict(unfold(out.to_dict(), fb, True))
    assert legacy.pair_ids == [item_pair_id("f2", pair)]


def test_undo_takes_an_earlier_releases_row_only_when_no_other_item_states_the_pair():
    pool = default_pool()
    fb = _item("f1")
    pair = fb.pairs()[0]
    prof = DriftProfile.empty({"name": "tiny"}, pool)
    row = torch.ones(len(pool))
    prof.add_rewards(pair.pair_id, row, row)  # one row for every item stating the pair
    learner = DriftLearner(DriftLearner.Config())
    shared = learner.undo(prof.to_dict(), fb, None, {"user": "u"}, [_item("f2")])
    assert not shared.changed and not shared.replay
    alone = learner.undo(prof.to_dict(), fb, None, {"user": "u"}, [])
    assert alone.changed and not alone.replay
    assert DriftProfile.from_dict(alone.state).pair_ids == []
