"""The engine worker: every running row of every method in one forward per round, per-row leave,
late joins, bounds."""

from __future__ import annotations

import asyncio

import pytest

from personalign.decoding.loop import generate
from personalign.decoding.sampling import SamplingConfig
from personalign.methods import get_method
from personalign.methods.base import BaseMethod
from personalign.methods.preference_prompting import PreferencePromptingMethod
from personalign.server.worker import Delta, Done, EngineWorker, Failed, Job, QueueFull
from personalign.types import Request
from personalign.views import HFBackend

PROMPTS = ["tell me a story about the cat", "the dog was happy and", "what is the sun", "a little girl and a boy"]


@pytest.fixture()
def backend(tiny_lm, tiny_chat_tokenizer):
    return HFBackend(tiny_lm, tiny_chat_tokenizer)


def _job(loop, prompt: str, method: str = "base", max_tokens: int = 6, stop=(), preference=None) -> Job:
    return Job(method=method, request=Request(prompt=[{"role": "user", "content": prompt}], preference=preference),
               max_tokens=max_tokens, sampling=SamplingConfig(temperature=0.0), stop=list(stop), loop=loop,
               events=asyncio.Queue())


async def _collect(job: Job) -> tuple[str, str]:
    parts = []
    while True:
        ev = await asyncio.wait_for(job.events.get(), 60)
        if isinstance(ev, Delta):
            parts.append(ev.text)
        elif isinstance(ev, Done):
            return "".join(parts), ev.finish_reason
        else:
            raise AssertionError(ev)


def _alone(backend, method, prompt: str, n: int, preference=None) -> str:
    return generate(method, [Request(prompt=[{"role": "user", "content": prompt}], preference=preference)], backend,
                    max_new_tokens=n, sampling=SamplingConfig(temperature=0.0))[0].text


def test_requests_arriving_together_share_a_batch_and_match_separate_decoding(backend):
    methods = {"base": BaseMethod(), "preference_prompting": PreferencePromptingMethod()}
    w = EngineWorker(backend, methods, max_batch=16, batch_wait=0.2)

    async def run():
        loop = asyncio.get_running_loop()
        jobs = [_job(loop, p) for p in PROMPTS] + [_job(loop, p, "preference_prompting", preference="kind")
                                                   for p in PROMPTS[:2]]
        for j in jobs:
            w.submit(j)
        return jobs, await asyncio.gather(*(_collect(j) for j in jobs))

    w.start()
    try:
        jobs, results = asyncio.run(run())
    finally:
        w.stop()
    assert w.stats.cohorts == 2  # one decode batch per method ...
    assert w.stats.max_cohort_rows == 6 and w.stats.max_methods_in_forward == 2  # ... all six rows in one forward
    for j, (text, _) in zip(jobs, results):
        pref = j.request.preference
        assert text == _alone(backend, methods[j.method], j.request.prompt[0]["content"], 6, pref)


def test_a_late_request_starts_while_others_run_and_rows_leave_on_their_own(backend):
    w = EngineWorker(backend, {"base": BaseMethod()}, max_batch=16, batch_wait=0.0)
    full = _alone(backend, BaseMethod(), PROMPTS[0], 30)
    words = full.split()
    stop = " " + words[1]

    async def run():
        loop = asyncio.get_running_loop()
        long_job = _job(loop, PROMPTS[1], max_tokens=30)
        stopped = _job(loop, PROMPTS[0], max_tokens=30, stop=[stop])
        w.submit(long_job)
        w.submit(stopped)
        first = await asyncio.wait_for(long_job.events.get(), 60)  # the batch is decoding
        late = _job(loop, PROMPTS[2], max_tokens=3)
        w.submit(late)
        late_result = await _collect(late)
        long_done_before_late = not long_job.events.empty() and long_job.done
        rest = await _collect(long_job)
        return first, rest, await _collect(stopped), late_result, long_done_before_late

    w.start()
    try:
        first, rest, stopped, late, long_done_first = asyncio.run(run())
    finally:
        w.stop()
    assert first.text + rest[0] == _alone(backend, BaseMethod(), PROMPTS[1], 30)
    assert stopped == (full[: full.find(stop)], "stop")
    assert late[0] == _alone(backend, BaseMethod(), PROMPTS[2], 3)
    assert not long_done_first  # the late row did not wait for the running batch to finish


def test_queue_bound_and_validation_errors(backend):
    w = EngineWorker(backend, {"base": BaseMethod(), "preference_prompting": PreferencePromptingMethod()},
                     max_pending=2, batch_wait=0.0)

    async def run():
        loop = asyncio.get_running_loop()
        a, b = _job(loop, PROMPTS[0]), _job(loop, PROMPTS[1], "preference_prompting")  # b has no preference
        w.submit(a)
        w.submit(b)
        with pytest.raises(QueueFull):
            w.submit(_job(loop, PROMPTS[2]))
        w.start()
        return await _collect(a), await asyncio.wait_for(b.events.get(), 60)

    try:
        a, b = asyncio.run(run())
    finally:
        w.stop()
    assert a[0] == _alone(backend, BaseMethod(), PROMPTS[0], 6)  # the bad neighbour failed alone
    assert isinstance(b, Failed) and b.status == 400 and "preference" in b.message
    with pytest.raises(ValueError, match="max_pending"):
        EngineWorker(backend, {}, max_pending=0)


def test_one_tick_is_one_batched_step(backend):
    """A 4-row batch of 5 tokens: the prefill gives the first, 4 rounds of one forward each the rest —
    as many forwards as ``generate`` on the batch."""
    w = EngineWorker(backend, {"base": BaseMethod()}, max_batch=16, batch_wait=0.5)

    async def run():
        loop = asyncio.get_running_loop()
        jobs = [_job(loop, p, max_tokens=5) for p in PROMPTS]
        for j in jobs:
            w.submit(j)
        return await asyncio.gather(*(_collect(j) for j in jobs))

    f0 = backend.forward_count
    w.start()
    try:
        results = asyncio.run(run())
    finally:
        w.stop()
    if any(reason != "length" for _, reason in results):
        pytest.skip("a row met EOS early; the step count would differ")
    assert w.stats.cohorts == 1 and w.stats.steps == 4
    used = backend.forward_count - f0
    f1 = backend.forward_count
    generate(BaseMethod(), [Request(prompt=[{"role": "user", "content": p}]) for p in PROMPTS], backend,
             max_new_tokens=5, sampling=SamplingConfig(temperature=0.0))
    assert used == backend.forward_count - f1


def test_methods_with_different_views_and_forwards_share_rounds_and_a_late_one_joins(backend):
    """base (1 view), linear_alignment (2 views), persona_judge (2 cache groups, several forwards per
    step, roll-backs) and a late preference_prompting request: each text equals its own decoding,
    every round runs one forward, and the late request's rows join the running forward."""
    methods = {"base": BaseMethod(), "preference_prompting": PreferencePromptingMethod(),
               "linear_alignment": get_method("linear_alignment")(),
               "persona_judge": get_method("persona_judge")(second_preference="be brief", draft_tokens=3)}
    w = EngineWorker(backend, methods, max_batch=16, batch_wait=0.3)
    first = [("base", None, 24), ("linear_alignment", "kind", 24), ("persona_judge", "kind", 24),
             ("persona_judge", "funny", 10)]

    async def run():
        loop = asyncio.get_running_loop()
        jobs = [_job(loop, PROMPTS[i], m, max_tokens=n, preference=p) for i, (m, p, n) in enumerate(first)]
        for j in jobs:
            w.submit(j)
        head = await asyncio.wait_for(jobs[0].events.get(), 60)  # decoding has started
        late = _job(loop, PROMPTS[3], "preference_prompting", max_tokens=4, preference="calm")
        w.submit(late)
        results = await asyncio.gather(*(_collect(j) for j in jobs + [late]))
        return jobs + [late], head, results

    f0 = backend.forward_count
    w.start()
    try:
        jobs, head, results = asyncio.run(run())
    finally:
        w.stop()
    used = backend.forward_count - f0
    texts = [r[0] for r in results]
    texts[0] = head.text + texts[0]
    alone_forwards = 0
    for j, text in zip(jobs, texts):
        f1 = backend.forward_count
        assert text == _alone(backend, methods[j.method], j.request.prompt[0]["content"], j.max_tokens,
                              j.request.preference), j.method
        alone_forwards += backend.forward_count - f1
    assert w.stats.max_methods_in_forward >= 3
    assert w.stats.max_cohort_rows >= 4
    assert w.stats.forwards == w.stats.steps  # every round: exactly one forward of the one model
    assert used < alone_forwards  # the rows shared forwards


def test_folds_share_the_rounds_within_their_budget(backend, tiny_lm):
    """A long fold queued before a chat: the chat is served at once (one bounded folding forward per
    round beside it), the fold finishes later with the log-probs of one uncached forward per row, and
    a full fold queue refuses more."""
    import torch
    from tests.numerics import assert_close_logprobs

    from personalign.server.worker import FoldJob

    g = torch.Generator().manual_seed(0)
    rows = [(torch.randint(8, 100, (30,), generator=g).tolist(), torch.randint(8, 100, (40,), generator=g).tolist())
            for _ in range(120)]  # far more than a few idle forwards can fold on any machine
    w = EngineWorker(backend, {"base": BaseMethod()}, batch_wait=0.0, max_folds=1, fold_unit_rows=4,
                     fold_idle_ms=5, fold_share=0.5)

    async def run():
        loop = asyncio.get_running_loop()
        fold = FoldJob(rows=rows, model="main", loop=loop, future=loop.create_future())
        w.submit_fold(fold)
        with pytest.raises(QueueFull, match="being folded"):
            w.submit_fold(FoldJob(rows=rows[:1], model="main", loop=loop, future=loop.create_future()))
        while w.stats.fold_forwards == 0:  # folding has started
            await asyncio.sleep(0.001)
        chat = _job(loop, PROMPTS[0], max_tokens=6)
        w.submit(chat)
        text, _ = await _collect(chat)
        assert not fold.future.done() and w.load()["folds_running"] == 1  # the chat did not wait for the fold
        return text, await asyncio.wait_for(fold.future, 120)

    w.start()
    try:
        text, got = asyncio.run(run())
    finally:
        w.stop()
    assert text == _alone(backend, BaseMethod(), PROMPTS[0], 6)
    want = backend.sequence_logprobs([p for p, _ in rows], [c for _, c in rows])
    for a, b in zip(got, want):
        assert_close_logprobs(a, b, tiny_lm, tokens=70)
    assert w.stats.folds == 1 and w.stats.fold_forwards > 10 and w.load()["folds_running"] == 0


def test_fold_on_a_backend_slower_than_the_idle_budget_finishes_in_bounded_forwards(tiny_chat_tokenizer, tiny_lm):
    """Every forward of this backend sleeps 40 ms, eight times ``fold_idle_ms``: the folding budget
    adapts to the machine (``server.fold_budget``), so the fold runs in forwards of hundreds of tokens,
    not the minimum (1 token a row: 280 forwards for these 8 rows), and its log-probs stay exact."""
    import time

    import torch
    from tests.numerics import assert_close_logprobs

    from personalign.server.worker import FoldJob

    class SlowBackend(HFBackend):
        def prefill(self, *args, **kwargs):
            time.sleep(0.04)
            return super().prefill(*args, **kwargs)

        def step(self, *args, **kwargs):
            time.sleep(0.04)
            return super().step(*args, **kwargs)

    backend = SlowBackend(tiny_lm, tiny_chat_tokenizer)
    g = torch.Generator().manual_seed(1)
    rows = [(torch.randint(8, 100, (30,), generator=g).tolist(), torch.randint(8, 100, (40,), generator=g).tolist())
            for _ in range(8)]
    w = EngineWorker(backend, {"base": BaseMethod()}, batch_wait=0.0, fold_unit_rows=4, fold_idle_ms=5)

    async def run():
        loop = asyncio.get_running_loop()
        fold = FoldJob(rows=rows, model="main", loop=loop, future=loop.create_future())
        w.submit_fold(fold)
        return await asyncio.wait_for(fold.future, 120)

    w.start()
    try:
        got = asyncio.run(run())
    finally:
        w.stop()
    # probes double from 4 tokens to the 512-token cap (8 forwards at most), then each 4-row unit of
    # 69 fed tokens a row needs a prefill and at most two steps
    assert w.stats.fold_forwards <= 8 + 2 * 3, w.stats.fold_forwards
    want = HFBackend(tiny_lm, tiny_chat_tokenizer).sequence_logprobs([p for p, _ in rows], [c for _, c in rows])
    for a, b in zip(got, want):
        assert_close_logprobs(a, b, tiny_lm, tokens=70)
