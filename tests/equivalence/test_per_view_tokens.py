"""HFBackend.step with per-view tokens [B, K, L] ≡ each view fed its own tokens in its own group."""

from __future__ import annotations

import pytest
import torch

from personalign.types import ViewSpec
from personalign.views import HFBackend
from tests.numerics import assert_close_logprobs


def test_per_view_tokens_equal_separate_groups(tiny_lm, tiny_tokenizer):
    tok = tiny_tokenizer
    a, b = tok("tell me a story")["input_ids"], tok("what is the sun")["input_ids"]
    views = [[ViewSpec(prompt_ids=a), ViewSpec(prompt_ids=b)], [ViewSpec(prompt_ids=b), ViewSpec(prompt_ids=a)]]
    feed = torch.tensor([[[30, 31], [40, 41]], [[50, 51], [60, 61]]])  # [B=2, K=2, L=2]
    together = HFBackend(tiny_lm, tok)
    st = together.prefill(views)
    lp = together.step(st, feed)
    apart = HFBackend(tiny_lm, tok)
    sa = apart.prefill(views, groups=[[0], [1]])
    for k in range(2):
        ref = apart.step(sa, feed[:, k], views=[k])
        assert_close_logprobs(lp[:, k], ref[:, 0], tiny_lm)
    assert_close_logprobs(st.last_logprobs, sa.last_logprobs, tiny_lm)
    with pytest.raises(ValueError, match="per-view `tokens`"):
        together.step(st, feed[:, :1].expand(2, 3, 2).contiguous())
