"""Feedback folds into the user's Drift profile online, and the next request decodes with it.

Golden property: the profile grown one feedback item at a time (``DriftProfile.add_pairs``) has
the weights of a profile fitted on all the pairs at once (``fit_profile``), i.e. the online update
is exact; removing an item (``remove_pair``) gives the fit on the remaining pairs.
"""

from __future__ import annotations

import pytest
import torch

from personalign.learners.drift import DriftLearnerConfig

drift = pytest.importorskip("personalign.personas.drift", reason="the Drift profile API is not on this branch")

from tests.numerics import drift_weights_atol  # noqa: E402

from personalign.decoding.loop import generate  # noqa: E402
from personalign.decoding.sampling import SamplingConfig  # noqa: E402
from personalign.types import Request  # noqa: E402

PAIRS = [("tell me a story", "the cat was very happy and kind", "the dog was sad"),
         ("what is the sky", "the sky is blue", "no , the sky is big and old and cold")]
MSG = [{"role": "user", "content": "tell me a story about the moon"}]
POOL = DriftLearnerConfig().pool  # the pool a new user's profile scores (the server's default)


def _weights(d: dict) -> torch.Tensor:
    return torch.tensor(list(d["weights"].values()))


def test_feedback_updates_drift_online_and_the_next_request_uses_it(live):
    if "drift" not in live.engine.methods:
        pytest.skip(f"drift is not served: {live.unavailable.get('drift')}")
    with live.client(live.new_key("drift")) as c:
        assert c.post("/v1/profiles", json={"user": "gina", "method": "drift"}).status_code == 201
        chat = {"model": "tiny", "messages": MSG, "max_tokens": 8, "temperature": 0, "user": "gina"}
        r = c.post("/v1/chat/completions", json=chat)
        assert r.status_code == 400 and "feedback" in r.json()["error"]["message"]  # nothing learned yet

        pairs = []
        for i, (prompt, chosen, rejected) in enumerate(PAIRS):
            r = c.post("/v1/feedback", json={"id": f"g{i}", "user": "gina", "prompt": prompt, "chosen": chosen,
                                             "rejected": rejected})
            assert r.status_code == 201 and r.json()["folded"] is True, r.text
            pairs.append(drift.PreferencePair(prompt, chosen, rejected))
            stored = c.get("/v1/profiles/gina").json()["drift_profile"]
            fitted = drift.fit_profile(live.backend, pairs, POOL).to_dict()  # a new user's pool on the server
            assert stored["num_pairs"] == len(pairs)
            # the server scored each pair alone, the fit all at once: float32 rounding of the forwards
            atol = drift_weights_atol(live.backend, pairs, float(drift.DriftProfile.from_dict(fitted).v.norm()))
            assert float((_weights(stored) - _weights(fitted)).abs().max()) <= atol

        r = c.post("/v1/chat/completions", json=chat).json()
        assert r["personalization"]["method"] == "drift" and r["personalization"]["drift"]["num_pairs"] == 2
        want = generate(live.engine.methods["drift"], [Request(prompt=MSG, params={"profile": stored})],
                        live.backend, max_new_tokens=8, sampling=SamplingConfig(temperature=0.0))[0].text
        assert r["choices"][0]["message"]["content"] == want

        assert c.delete("/v1/feedback/g1").json()["unfolded"] is True
        stored = c.get("/v1/profiles/gina").json()["drift_profile"]
        assert stored["num_pairs"] == 1
        one = drift.fit_profile(live.backend, pairs[:1], POOL).to_dict()
        atol = drift_weights_atol(live.backend, pairs[:1], float(drift.DriftProfile.from_dict(one).v.norm()))
        assert float((_weights(stored) - _weights(one)).abs().max()) <= atol


def test_malformed_drift_profile_is_rejected(live):
    with live.client(live.new_key("drift-bad")) as c:
        r = c.post("/v1/profiles", json={"user": "hal", "drift_profile": {"weights": {"formal": 1.0}}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "drift_profile"
