"""Writes ``legacy_store.sqlite``: a store as the release before ``learner_states`` wrote it (Drift
weights and the P-DPO embedding in the profile's own columns; feedback items keeping the embedding
under ``pdpo_embedding``; one item stale). Run it with that release installed:

    python tests/unit/learners/data/make_legacy_store.py tests/unit/learners/data/legacy_store.sqlite
"""

from __future__ import annotations

import sys

import torch

from personalign.personas.attributes import default_pool
from personalign.personas.drift import DriftProfile
from personalign.server.store import Store, StoredFeedback
from personalign.training.pdpo.user_fit import UserEmbedding


def main(path: str) -> None:
    store = Store(f"sqlite:///{path}")
    owner, _ = store.create_key("legacy")
    pool = default_pool()
    prof = DriftProfile.empty({"name": "tiny"}, pool)
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        prof.add_rewards(f"pair{i}@f{i}", torch.randn(len(pool), generator=g), torch.randn(len(pool), generator=g))
    emb = UserEmbedding(torch.randn(2, 8, generator=g), num_pairs=3).to_dict()
    store.create_profile(owner, "alice", {"method": "drift", "drift_profile": prof.to_dict()})
    store.create_profile(owner, "bob", {"method": "pdpo", "pdpo_embedding": emb, "preference": "short"})
    store.create_profile(owner, "carol", {"preference": "plain words"})
    for i in range(3):
        fb = StoredFeedback(f"f{i}", "bob", [{"role": "user", "content": f"q{i}"}], f"yes {i}", f"no {i}", None,
                            False, 1.0 + i)
        store.add_feedback(owner, fb)
        learned = {"stale": True} if i == 2 else {"pdpo_embedding": emb}
        p = store.get_profile(owner, "bob")
        store.complete_fold(owner, f"f{i}", {"pdpo_embedding": emb}, p["version"], learned)
    store.close()


if __name__ == "__main__":
    main(sys.argv[1])
