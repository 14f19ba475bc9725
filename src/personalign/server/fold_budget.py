"""The folding budget: when the engine's next folding forward runs, and how many tokens it feeds.

Feedback folding shares the engine's rounds with decoding (``server.worker``, step 4): each round
runs at most one folding forward. Its size comes from a cost model of the machine it runs on,
``FoldCost``: a forward's time is ``a + b · n`` for ``n`` tokens (``a``: the weights read once and the
per-call overhead; ``b``: the work per token), fitted online by least squares with forgetting.

Rules (``FoldBudget``):

* **Progress in proportion to time.** A forward feeds at least ``a / b`` tokens (and at least the
  caller's minimum), so its fixed part is at most half its time: folding advances at least at half
  its full rate for every second it is given, whatever the CPU's speed or load. Without this floor a
  machine whose fixed part exceeds the budget would feed the minimum for good, a few tokens a forward.
* **A fit that can tell.** Forwards of one size cannot separate ``a`` from ``b``, nor can forwards of
  nearby sizes on a noisy machine (the slope must be at least twice its standard error); while the
  fit cannot tell, the next forward probes at twice the last size, so the model never locks itself at
  one size, nor at a size a noisy slope suggested.
* **Idle**: nothing decodes, a forward takes ``idle`` seconds (the longest a request arriving
  meanwhile waits to start) or the time of the floor's forward where that is longer.
* **Busy**: folding earns ``share`` of each round's decoding time as credit, capped at one idle
  forward or one floor forward, whichever is longer, and spends it on a forward once it covers the
  floor: over any stretch of decoding, folding takes about ``share`` of the time.
* **Bounded memory.** At most ``max_tokens`` tokens a forward: its log-probs are ``[tokens, V]``.
"""

from __future__ import annotations

import math

__all__ = ["FoldBudget", "FoldCost"]


class FoldCost:
    """A folding forward's time as ``a + b · tokens``, fitted online to the forwards run."""

    def __init__(self, decay: float = 0.9) -> None:
        self.decay = decay
        self.n = self.t = self.d = self.tt = self.td = self.dd = 0.0
        self.last: int | None = None  # the size of the last forward observed

    def observe(self, tokens: int, seconds: float) -> None:
        k = self.decay
        self.n, self.t, self.d = k * self.n + 1, k * self.t + tokens, k * self.d + seconds
        self.tt, self.td = k * self.tt + tokens * tokens, k * self.td + tokens * seconds
        self.dd = k * self.dd + seconds * seconds
        self.last = tokens

    def fit(self) -> tuple[float, float, bool]:
        """``(a, b, known)`` in seconds and seconds per token. ``known`` is False while the forwards seen
        cannot separate ``a`` from ``b``: none yet, fewer than three, all of one size, or sizes so close
        that the times' noise (a busy machine) could make up the slope — ``b`` not at least twice its
        standard error. Then ``a = 0`` and ``b`` is the mean time per token (1 ms before any forward), a
        per-token cost no lower than the true one. (A slope fitted to noise between forwards of a few
        tokens would put ``a / b`` at a few tokens, and forwards of that size would never show it wrong.)"""
        if self.n < 1e-9:
            return 0.0, 1e-3, False
        mt, md = self.t / self.n, self.d / self.n
        var = self.tt / self.n - mt * mt
        if var > 1e-6 * max(1.0, mt * mt) and self.n > 2.5:
            cov = self.td / self.n - mt * md
            b = cov / var
            residual = max(0.0, self.dd / self.n - md * md - cov * cov / var)  # per forward, around the fit
            if b > 0 and b * b >= 4.0 * residual / ((self.n - 2.0) * var):
                return max(0.0, md - b * mt), b, True
        return 0.0, md / max(mt, 1.0), False

    def seconds(self, tokens: int) -> float:
        a, b, _ = self.fit()
        return a + b * tokens


class FoldBudget:
    """Sizes and times folding forwards (module docstring).

    Args:
        share: while requests decode, folding may take this share of their decoding time.
        idle: seconds of a folding forward when nothing decodes.
        max_tokens: tokens a forward feeds at most.
    """

    def __init__(self, share: float, idle: float, max_tokens: int = 512) -> None:
        if max_tokens < 1:
            raise ValueError(f"`max_tokens` must be >= 1, got {max_tokens}.")
        self.share, self.idle, self.max_tokens = share, idle, max_tokens
        self.credit = 0.0  # seconds of folding earned while requests decode

    def reset(self) -> None:
        """Nothing to fold: no credit is kept for later."""
        self.credit = 0.0

    def floor(self, cost: FoldCost, least: int) -> int:
        """The smallest forward worth running: its fixed part at most half its time, a probe while the
        fit cannot tell, at least ``least`` tokens, at most ``max_tokens`` (unless ``least`` is more)."""
        a, b, known = cost.fit()
        n = math.ceil(a / b)
        if not known and cost.last is not None:
            n = max(n, 2 * cost.last)
        return max(least, min(n, self.max_tokens))

    def plan(self, cost: FoldCost, least: int, busy: bool, decode_seconds: float) -> int | None:
        """Tokens this round's folding forward feeds, or None when it waits for credit.

        Args:
            cost: the cost model of the work to run (folds and fold tasks keep their own).
            least: tokens the work needs a forward to feed at least.
            busy: requests are decoding (or about to start).
            decode_seconds: this round's decoding forward time.
        """
        floor = self.floor(cost, least)
        floor_seconds = cost.seconds(floor)
        if busy:
            self.credit = min(self.credit + self.share * decode_seconds, max(self.idle, floor_seconds))
            if self.credit < floor_seconds:
                return None
            budget = self.credit
        else:
            self.credit, budget = 0.0, max(self.idle, floor_seconds)
        a, b, _ = cost.fit()
        return max(floor, min(self.max_tokens, int((budget - a) / b)))

    def spent(self, seconds: float, busy: bool) -> None:
        """A forward ran for ``seconds``; while busy it is paid from the credit."""
        if busy:
            self.credit -= seconds
