"""A new user's P-DPO embedding fitted from their own feedback, the LLM and its LoRA frozen.

Paper: Li et al., P-RLHF, Section 4.4. The paper trains the user model jointly with the LoRA adapter
on the users of its training data; a user it never saw decodes with the generic embedding ``e_0``
forever. This module is our extension: for one such user, only their implicit embedding
``e_u`` [T_u, D] is trained, on the pairs their feedback states, with the P-DPO loss at ``alpha = 1``
(the user's own term), everything else frozen:

    l(e_u) = mean over pairs of -log sigma(beta * h),
    h = (log pi_p(y_w | e_u, x) - log ref(y_w | x)) - (log pi_p(y_l | e_u, x) - log ref(y_l | x))

(``loss="ipo"``: ``(h - 1/(2 beta))^2``), minimised by Adam from ``e_u = e_0`` (or the user's last
fitted embedding).

NOTE: the reference is ``pi_p(. | e_0, x)``, the personalized LLM seen through the generic user, not
``pi_SFT``: the adapter is merged into the only copy of the personalized model the server holds, and
with it the fit starts where DPO starts (policy = reference, ``h = 0``, ``l = log 2``), so the fit
learns how this user differs from the generic user, which is what ``e_0`` was trained to be.

``EmbeddingFit`` runs a fit in bounded pieces: ``advance(tokens)`` runs the forwards (and backward)
of as many whole pairs as ``tokens`` covers (at least one), so the server's engine can interleave it
with decoding within its folding budget (``server.worker``); each pair runs alone and the gradient of
a step is summed pair by pair, so the fit is the same, bit for bit, whatever the pieces (tested).
``fit_user_embedding`` runs one to the end.

A fitted embedding travels as ``UserEmbedding`` (``to_dict``: shape, float32 little-endian base64
data, the pairs it was fitted on), stored with the user's server profile and read by ``pdpo``
(``PDPOConfig.user_embedding``).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from personalign.config import check_choice, check_int, check_positive
from personalign.training.pdpo.data import TokenizedPair
from personalign.training.pdpo.loss import PREFERENCE_LOSSES, check_beta
from personalign.training.pdpo.model import sequence_logps
from personalign.training.user_model import UserModel

__all__ = ["EmbeddingFitConfig", "EmbeddingFit", "UserEmbedding", "fit_user_embedding", "generic_embedding"]


@dataclass(frozen=True, kw_only=True)
class EmbeddingFitConfig:
    """How one fit runs (one fit per feedback item on the server).

    Attributes:
        steps: Adam steps per fit, each over all of the fit's pairs.
        lr: Adam's learning rate, in units of the std of the LLM's input embeddings (so one setting
            suits models of any embedding scale).
        max_pairs: the most recent pairs a fit sees (older ones live on in the starting embedding).
        max_response_tokens: tokens of a reply scored (its first ones; the EOS counts).
        beta: the DPO strength (the P-DPO training default).
        loss: ``dpo`` | ``ipo``.
        max_shift: a trust region around ``e_0``: after every step, each position's shift
            ``e_u[t] − e_0[t]`` is scaled back to a root-mean-square of at most ``max_shift`` times the
            std of the LLM's input embeddings (0 = no bound). A few pairs otherwise push the soft prompt
            far outside the embeddings the model was trained on, where a small model stops writing text.
    """

    steps: int = 3
    lr: float = 0.2
    max_pairs: int = 4
    max_response_tokens: int = 128
    beta: float = 0.5
    loss: str = "dpo"
    max_shift: float = 0.5

    def __post_init__(self) -> None:
        for name in ("steps", "max_pairs", "max_response_tokens"):
            check_int(name, getattr(self, name), 1)
        check_positive("lr", self.lr)
        check_beta(self.beta)
        check_positive("max_shift", self.max_shift, allow_zero=True)  # 0 = no bound
        check_choice("loss", self.loss, PREFERENCE_LOSSES)


@dataclass(frozen=True)
class UserEmbedding:
    """A user's fitted implicit embedding ``e_u`` float32 [T_u, D] and how many pairs it has seen."""

    tensor: torch.Tensor
    num_pairs: int = 0
    loss: float | None = None  # the fit's last loss (mean over its pairs), None before any fit
    digest: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        t = self.tensor.detach().to(torch.float32).cpu().contiguous()
        object.__setattr__(self, "tensor", t)
        object.__setattr__(self, "digest", hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16])

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.tensor.shape[0]), int(self.tensor.shape[1])

    def to_dict(self) -> dict[str, Any]:
        data = base64.b64encode(self.tensor.numpy().astype("<f4").tobytes()).decode("ascii")
        return {"format": "float32-base64", "shape": list(self.shape), "data": data, "num_pairs": self.num_pairs,
                "loss": self.loss, "sha256": self.digest}

    @classmethod
    def from_dict(cls, d: Any, where: str = "user_embedding") -> UserEmbedding:
        """Read ``to_dict``'s form; ``ValueError`` naming ``where`` and the field otherwise."""
        if isinstance(d, UserEmbedding):
            return d
        if not isinstance(d, dict):
            raise ValueError(f"`{where}` must be an object {{'format': 'float32-base64', 'shape': [T_u, D], "
                             f"'data': ...}}, got {type(d).__name__}.")
        if d.get("format") != "float32-base64":
            raise ValueError(f"`{where}.format` must be 'float32-base64', got {d.get('format')!r}.")
        shape = d.get("shape")
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) and not isinstance(s, bool)
                                                                    and 1 <= s <= 65536 for s in shape)):
            raise ValueError(f"`{where}.shape` must be [T_u, D], two integers in 1..65536, got {shape!r}.")
        try:
            raw = base64.b64decode(str(d.get("data", "")), validate=True)
        except ValueError:
            raise ValueError(f"`{where}.data` must be base64 text.") from None
        if len(raw) != 4 * shape[0] * shape[1]:
            raise ValueError(f"`{where}.data` holds {len(raw)} bytes; shape {shape} needs {4 * shape[0] * shape[1]}.")
        arr = np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float32)
        if not np.isfinite(arr).all():
            raise ValueError(f"`{where}.data` holds values that are not finite.")
        n = d.get("num_pairs", 0)
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"`{where}.num_pairs` must be an integer >= 0, got {n!r}.")
        loss = d.get("loss")
        if loss is not None and (isinstance(loss, bool) or not isinstance(loss, (int, float))):
            raise ValueError(f"`{where}.loss` must be a number or null, got {loss!r}.")
        return cls(torch.from_numpy(arr.copy()), num_pairs=n, loss=None if loss is None else float(loss))


def generic_embedding(users: UserModel) -> torch.Tensor:
    """``e_0`` float32 [T_u, D]: the implicit embedding of row 0 (the unknown user)."""
    with torch.no_grad():
        return users.implicit(torch.tensor([0]))[0].detach().float().cpu()


class EmbeddingFit:
    """One fit of a user embedding, run in bounded pieces (module docstring).

    Args:
        lm: the personalized LLM (LoRA merged or attached), frozen: no parameter is changed or gets a
            ``.grad``.
        pairs: the user's tokenized pairs (prompt, chosen, rejected ids; ``user_text_ids`` ignored).
        start: the embedding the fit starts from, float [T_u, D].
        generic: ``e_0`` float [T_u, D], the reference's prefix.
        config: steps, learning rate, beta, loss.
        embedding_std: the std of the LLM's input embeddings (the learning rate's unit); measured from
            ``lm`` when None.
    """

    def __init__(self, lm: nn.Module, pairs: Sequence[TokenizedPair], start: torch.Tensor, generic: torch.Tensor,
                 config: EmbeddingFitConfig | None = None, *, embedding_std: float | None = None) -> None:
        if not pairs:
            raise ValueError("an embedding fit needs at least one pair.")
        if start.shape != generic.shape or start.dim() != 2:
            raise ValueError(f"the start embedding {tuple(start.shape)} and e_0 {tuple(generic.shape)} must both be "
                             "[T_u, D].")
        self.config = config or EmbeddingFitConfig()
        self.lm = lm
        emb = lm.get_input_embeddings().weight
        if start.shape[1] != emb.shape[1]:
            raise ValueError(f"the embedding has width {start.shape[1]}, the model {emb.shape[1]}.")
        self.device, self.dtype = emb.device, emb.dtype
        cut = self.config.max_response_tokens
        self.pairs = [(p.prompt_ids, p.chosen_ids[:cut], p.rejected_ids[:cut]) for p in pairs]
        self.generic = generic.detach().to(self.device, torch.float32)
        self.e = nn.Parameter(start.detach().to(self.device, torch.float32).clone())
        std = float(emb.detach().float().std()) if embedding_std is None else float(embedding_std)
        self.opt = torch.optim.Adam([self.e], lr=self.config.lr * std)
        self.radius = self.config.max_shift * std  # per position, root-mean-square over D (0: unbounded)
        self.reference = torch.zeros(len(self.pairs), 2)
        self._ref_done = 0  # pairs whose reference log-probs are computed
        self._step, self._pos = 0, 0  # current step and the next pair of that step
        self._grad = torch.zeros_like(self.e)
        self._loss_sum = 0.0
        self.losses: list[float] = []  # the mean loss of each step (measured before its update)
        self.forwards = 0

    def pair_tokens(self, i: int) -> int:
        """Tokens a pair's two sequences feed (prefix, prompt and reply, twice)."""
        pr, ch, rj = self.pairs[i]
        return 2 * (self.e.shape[0] + len(pr)) + len(ch) + len(rj)

    @property
    def total_tokens(self) -> int:
        """Tokens the whole fit feeds: the reference once, then every step."""
        return (1 + self.config.steps) * sum(self.pair_tokens(i) for i in range(len(self.pairs)))

    @property
    def done(self) -> bool:
        return self._step >= self.config.steps

    def _take(self, start: int, tokens: int) -> int:
        end, used = start, 0
        while end < len(self.pairs) and (end == start or used + self.pair_tokens(end) <= tokens):
            used += self.pair_tokens(end)
            end += 1
        return end

    def _logps(self, a: int, b: int, prefix: torch.Tensor) -> torch.Tensor:
        sel = self.pairs[a:b]
        prompts = [p for p, _, _ in sel] * 2
        replies = [c for _, c, _ in sel] + [r for _, _, r in sel]
        logps = sequence_logps(self.lm, prompts, replies, [prefix.to(self.dtype)] * len(prompts))
        return torch.stack([logps[: b - a], logps[b - a:]], 1)  # [pairs, 2] chosen, rejected

    def advance(self, tokens: int) -> int:
        """Run the next piece: whole pairs worth at most ``tokens`` (at least one); the tokens fed.

        Each pair's forwards (and backward) run alone, and the step's gradient is summed pair by pair in
        order, so the fit does the same arithmetic however it is cut into pieces: its result does not
        depend on the budget it ran in (a replay after a delete gives the same embedding)."""
        if self.done:
            return 0
        with torch.enable_grad():
            if self._ref_done < len(self.pairs):  # the reference, once
                a = self._ref_done
                b = self._take(a, tokens)
                with torch.no_grad():
                    for i in range(a, b):
                        self.reference[i] = self._logps(i, i + 1, self.generic)[0].float().cpu()
                self._ref_done = b
            else:
                a = self._pos
                b = self._take(a, tokens)
                fn = PREFERENCE_LOSSES[self.config.loss]
                for i in range(a, b):
                    pol = self._logps(i, i + 1, self.e).float()
                    ref = self.reference[i:i + 1].to(pol.device)
                    loss = fn(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], self.config.beta).sum() / len(self.pairs)
                    (g,) = torch.autograd.grad(loss, [self.e])  # only e_u: the model's parameters get no grad
                    self._grad += g
                    self._loss_sum += float(loss.detach())
                self._pos = b
                if b == len(self.pairs):  # the step's gradient is complete
                    self.e.grad = self._grad
                    self.opt.step()
                    self.e.grad = None
                    self._project()
                    self._grad = torch.zeros_like(self.e)
                    self.losses.append(self._loss_sum)
                    self._loss_sum, self._pos, self._step = 0.0, 0, self._step + 1
        self.forwards += 1
        return sum(self.pair_tokens(i) for i in range(a, b))

    @torch.no_grad()
    def _project(self) -> None:
        """Scale each position's shift from ``e_0`` back into the trust region (``max_shift``)."""
        if self.radius <= 0:
            return
        shift = self.e - self.generic  # [T_u, D]
        rms = shift.pow(2).mean(-1).sqrt()
        over = rms > self.radius  # positions inside the region are left exactly as the step left them
        if bool(over.any()):
            self.e[over] = self.generic[over] + shift[over] * (self.radius / rms[over])[:, None]

    def result(self, num_pairs: int) -> UserEmbedding:
        """The fitted embedding (``num_pairs``: the pairs the user's embedding has now seen in all)."""
        if not self.done:
            raise RuntimeError("the fit has not finished.")
        return UserEmbedding(self.e.detach().float().cpu(), num_pairs=num_pairs,
                             loss=self.losses[-1] if self.losses else None)


def fit_user_embedding(lm: nn.Module, users: UserModel, pairs: Sequence[TokenizedPair], *,
                       start: torch.Tensor | UserEmbedding | None = None, config: EmbeddingFitConfig | None = None,
                       tokens: int = 1 << 30, num_pairs: int | None = None) -> tuple[UserEmbedding, EmbeddingFit]:
    """Fit a new user's embedding on ``pairs`` to the end (``EmbeddingFit``); returns it and the fit.

    ``start``: the user's last embedding (default ``e_0``); ``tokens``: the size of each piece.
    """
    generic = generic_embedding(users)
    if isinstance(start, UserEmbedding):
        start = start.tensor
    fit = EmbeddingFit(lm, pairs, generic if start is None else start, generic, config)
    while not fit.done:
        fit.advance(tokens)
    return fit.result(len(pairs) if num_pairs is None else num_pairs), fit
