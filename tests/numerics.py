"""Tolerances for float32 comparisons, derived from the precision and the size of the reductions.

Two float32 computations of the same quantity agree bit for bit only when the same kernels run on
the same shapes in the same order. Everything else this suite compares (a cached step against an
uncached forward, a row in a batch of three against the same row alone, a lean LoRA forward against
PEFT's) sums the same terms in a different order, and the CPU's matmul library picks its kernel,
and so its summation order, by CPU model, thread count and matrix shape. Those comparisons use the
bounds below; exact equality is asserted only where the code runs the same ops on the same shapes
by construction, and each such test says so.

The bound. A dot product of ``n`` float32 terms computed in two orders differs by at most
``γ_n · Σ|terms|`` (``γ_n ≈ n·u``, ``u = eps/2`` the unit roundoff); rounding errors are
independent in practice, so the difference is ``≈ √n · u · ‖terms‖`` with a Gaussian tail. A
decoder forward chains ``L + 1`` stages of such reductions (``L`` layers, each an attention and an
MLP behind a normalization that keeps magnitudes O(1), then the output head), and log-softmax adds
a log-sum-exp over ``V`` terms. The log-probs of two orderings therefore differ by about

    ``(L + 1) · √n · eps · M``,

``n`` the longest reduction of the forward (hidden size, MLP width, vocabulary or the attended
tokens) and ``M`` the magnitude of the compared values (the largest finite |log p|). ``SAFETY = 4``
covers the tail (four standard deviations of the rounding walk). For the suite's tiny Llama (2
layers, n = 114, |log p| ≤ 8) this is ≈ 1.2e-4; the differences measured on an AMD EPYC at 1 and 2
threads stay below 2.6e-5 (below 1e-5 on the Intel CPU where the suite was first written), while
real defects (a wrong position id, one padding column attended, a stale cache row, a LoRA delta
0.1 % off) move them by 1e-3 or more: ``scripts/tolerance_mutations.py`` makes each such defect
on purpose and checks that the tests catch it.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["EPS32", "SAFETY", "forward_atol", "assert_close_logprobs", "assert_close_forward", "reduction_atol", "lowp_atol",
           "assert_greedy_matches"]

EPS32 = torch.finfo(torch.float32).eps  # 2**-23: the spacing of float32 numbers in [1, 2)
SAFETY = 4.0


def _config(model: Any) -> Any:
    cfg = getattr(model, "config", model)
    return getattr(cfg, "text_config", None) or cfg


def _reduction_length(cfg: Any, tokens: int) -> int:
    sizes = [getattr(cfg, name, None) for name in ("hidden_size", "intermediate_size", "vocab_size", "n_embd")]
    return max([int(s) for s in sizes if s] + [int(tokens), 1])


def forward_atol(model: Any, reference: torch.Tensor, *, tokens: int = 0) -> float:
    """The absolute tolerance between two float32 forwards of ``model`` that differ only in the order
    of their reductions (batch composition, cached vs recomputed, kernel choice).

    Args:
        model: the model (or its config): its depth and widths size the bound.
        reference: the values compared against (log-probs or logits); their magnitude scales it.
        tokens: the longest attended sequence, when it exceeds the model's widths.
    """
    cfg = _config(model)
    depth = int(getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 1)) + 1
    finite = reference[torch.isfinite(reference)]
    magnitude = float(finite.abs().max()) if finite.numel() else 0.0
    return SAFETY * EPS32 * math.sqrt(_reduction_length(cfg, tokens)) * depth * magnitude


def reduction_atol(n: int, magnitude: float) -> float:
    """The tolerance for ONE reduction of ``n`` float32 terms of size ``magnitude`` computed in two
    orders (a matrix product, a sum): ``SAFETY · √n · eps · magnitude``."""
    return SAFETY * EPS32 * math.sqrt(max(n, 1)) * max(magnitude, 1e-30)


def assert_close_logprobs(got: torch.Tensor, want: torch.Tensor, model: Any, *, tokens: int = 0) -> None:
    """``got`` and ``want`` are the same log-probs up to float32 reordering of ``model``'s forward:
    the same entries are −inf, and the finite ones differ by at most ``forward_atol``."""
    assert got.shape == want.shape, f"shapes differ: {tuple(got.shape)} vs {tuple(want.shape)}"
    assert torch.equal(torch.isfinite(got), torch.isfinite(want)), "the −inf (or NaN) entries differ"
    finite = torch.isfinite(want)
    if not bool(finite.any()):
        return
    atol = forward_atol(model, want, tokens=tokens)
    diff = float((got - want).abs()[finite].max())
    assert diff <= atol, f"max |diff| {diff:.3g} > {atol:.3g} (the float32 bound for this model)"


def lowp_atol(model: Any, reference: torch.Tensor, dtype: torch.dtype) -> float:
    """The tolerance between two forwards of ``model`` in a 16-bit ``dtype`` (bfloat16, float16).

    Their kernels accumulate in float32 and round each op's output to ``dtype``: two kernels then
    part by about one rounding of an op's output (``eps(dtype) · M``) per stage, compounding over the
    ``L + 1`` stages; ``2 ·`` for both sides. (The float32 reduction error is negligible beside it.)
    """
    cfg = _config(model)
    depth = int(getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 1)) + 1
    finite = reference[torch.isfinite(reference)].float()
    magnitude = float(finite.abs().max()) if finite.numel() else 0.0
    return 2.0 * torch.finfo(dtype).eps * depth * magnitude


def assert_close_forward(got: torch.Tensor, want: torch.Tensor, model: Any, *, tokens: int = 0) -> None:
    """Logits, hidden states or gradients of two forwards of ``model`` that differ only in kernels:
    equal up to ``forward_atol`` in float32, ``lowp_atol`` in a 16-bit dtype (``got``'s)."""
    assert got.shape == want.shape, f"shapes differ: {tuple(got.shape)} vs {tuple(want.shape)}"
    if got.dtype in (torch.bfloat16, torch.float16):
        atol = lowp_atol(model, want, got.dtype)
    else:
        atol = forward_atol(model, want, tokens=tokens)
    diff = float((got.float() - want.float()).abs().max())
    assert diff <= atol, f"max |diff| {diff:.3g} > {atol:.3g} (the {got.dtype} bound for this model)"


def assert_greedy_matches(got: list[int], want: list[int], margins: list[float], atol: float) -> None:
    """Greedy tokens equal the reference's, except that they may part at a near-tie: at the first
    position where they differ, the reference's best two scores must lie within ``atol`` (float
    rounding can order a tie either way); after it the texts are different and nothing is compared.

    Args:
        got, want: the two token lists.
        margins: the reference's (best − second best) score at each of its steps.
        atol: the float32 tolerance of the scores compared.
    """
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            assert margins[i] <= atol, (f"token {i} differs ({a} vs {b}) where the reference's margin "
                                        f"{margins[i]:.3g} exceeds the float32 tolerance {atol:.3g}: {got} vs {want}")
            return
    assert len(got) == len(want), f"lengths differ: {got} vs {want}"


def drift_weights_atol(backend: Any, pairs: Any, v_norm: float, *, model: str = "main",
                       chat_template: bool = True) -> float:
    """The tolerance on Drift weights ``p = v / ‖v‖`` fitted from ``pairs`` by two scorings that batch
    the pairs differently (an online update against a fit on all pairs at once).

    Each entry of ``W`` and ``L`` sums, over a response's ``T`` tokens, a log-ratio of two forwards, so
    it moves by at most ``2 · T · forward_atol`` (``M`` = the largest |log p| of those tokens, measured
    here under the plain prompt); ``v`` sums the ``N`` pairs' ``W − L``; normalizing by ``‖v‖`` at most
    doubles an absolute error: ``|Δp| ≤ 8 · N · T · forward_atol / ‖v‖``.
    """
    from personalign.personas.prompts import build_prompt_ids

    tok = backend.tokenizer(model)
    prompts, conts = [], []
    for p in pairs:
        ids = list(build_prompt_ids(tok, p.prompt, chat_template=chat_template))
        for reply in (p.chosen, p.rejected):
            prompts.append(ids)
            conts.append(tok(reply, add_special_tokens=False)["input_ids"])
    lps = backend.sequence_logprobs(prompts, conts, model=model)
    T = max(len(c) for c in conts)
    M = torch.cat(lps).abs().max()
    return 8.0 * len(pairs) * T * forward_atol(backend.models[model], M[None]) / max(v_norm, 1e-12)
