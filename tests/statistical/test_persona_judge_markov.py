"""Method-level exactness: persona_judge with fixed roles samples the judge's Markov chain.

Crafted backend over a V-token vocabulary: view k's next-token distribution is a fixed transition
table ``T_k[last token]``. With fixed roles (view 0 drafts, view 1 judges) every emitted token must be
distributed as ``T_1[previous token]`` — the draft view only changes speed (App. C.2 applied at
every position, through the whole decoding loop: ragged acceptance, roll-back, pending tokens).

Check: over B rows × 8 tokens, the bigram counts ``n[a, b]`` of emitted text, for each previous token
a with enough visits, pass a Pearson chi-square against ``T_1[a]`` (combined over a: one statistic,
p-value > 1e-3), and the visit-weighted total variation is below 0.03 (for counts drawn from T_1
itself, with these visit numbers, that TV has median 0.018 and 99th percentile 0.025 by simulation;
T_0 is 0.42 away). A power check shows the same counts fail against the draft table T_0. Both
schedules (lockstep, block) are checked.
"""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chi2
from tests.crafted_backend import CraftedBackend

from personalign import Request, SamplingConfig, generate
from personalign.methods import get_method

pytestmark = pytest.mark.statistical
S = 6  # live states: tokens 40..45 of the tiny vocabulary


def _tables(V: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    t = torch.full((2, V, V), -1e4)
    live = torch.arange(40, 40 + S)
    logits = torch.randn(2, S, S, generator=g) * 1.2
    for k in range(2):
        t[k][:, live] = logits[k, 0]  # any other last token (the prompt's) -> row 0 of the chain
        t[k][live[:, None], live[None, :]] = logits[k]
    return t


def _bigrams(tiny_chat_tokenizer, schedule):
    V = len(tiny_chat_tokenizer)
    tables = _tables(V)
    be = CraftedBackend(tables, tiny_chat_tokenizer)
    method = get_method("persona_judge")(second_preference="judge", alternate=False, draft_tokens=3,
                                                schedule=schedule)
    reqs = [Request(prompt="tell me a story", preference="draft")] * 1500
    outs = generate(method, reqs, be, max_new_tokens=8, ignore_eos=True, sampling=SamplingConfig(temperature=1.0),
                    generator=torch.Generator().manual_seed(1))
    counts = torch.zeros(S, S)
    for o in outs:
        seq = [t - 40 for t in o.token_ids]
        assert min(seq) >= 0 and max(seq) < S
        for a, b in zip(seq, seq[1:]):
            counts[a, b] += 1
    live = torch.arange(40, 40 + S)
    return counts, be.tables[:, live[:, None], live[None, :]].exp(), outs


def _chain_test(counts: torch.Tensor, T: torch.Tensor) -> tuple[float, float]:
    stat, df, tv = 0.0, 0, 0.0
    for a in range(S):
        n = counts[a].sum()
        exp = T[a] / T[a].sum() * n
        stat += float(((counts[a] - exp) ** 2 / exp).sum())
        df += S - 1
        tv += 0.5 * float((counts[a] / n - T[a] / T[a].sum()).abs().sum()) * float(n)
    return float(chi2.sf(stat, df)), tv / float(counts.sum())


@pytest.mark.parametrize("schedule", ["lockstep", "block"])
def test_fixed_roles_emit_the_judges_chain(tiny_chat_tokenizer, schedule):
    counts, T, outs = _bigrams(tiny_chat_tokenizer, schedule)
    assert counts.sum() == 1500 * 7 and counts.sum(1).min() > 300
    rates = [o.stats["acceptance_rate"] for o in outs]
    assert 0.2 < sum(rates) / len(rates) < 0.95  # the draft really is different
    pval, tv = _chain_test(counts, T[1])
    assert pval > 1e-3 and tv < 0.03, (pval, tv)
    pval0, tv0 = _chain_test(counts, T[0])
    assert pval0 < 1e-6  # power: the draft's chain is rejected
