"""``pdpo``: generation from a P-DPO personalized LLM ``pi_p(y | x, u)`` for seen and new users.

Paper: Li et al., P-RLHF, Sections 4.3-4.4 (Figure 2). A checkpoint from ``personalign train pdpo``
holds a LoRA adapter, a user model and the user-id index. The adapter is merged into the backend's
main model once; every request then decodes ``pi_p`` with its user embedding as a soft prompt:

    e_u = concat(f_im(row(u_p)), f_ex(u_t))      ViewSpec(prompt_ids=x, prefix_embeds=e_u)
    scores = log pi_p(. | e_u, x, y_<t)

A seen user gets their own row; an unknown user (or none) gets row 0, the generic ``e_0`` (logged
once per id), optionally warmed up with their text ``u_t``. The user of a request is
``request.params["user"]`` if set, else ``request.user``, else the method's ``user`` default; the text is
``user_text`` from ``request.params`` or the method default. Users of one batch may all differ: each row
carries its own soft prompt through one batched, cached forward per step. Soft prompts are computed
once per (row, text) and cached.

Assembly (``personalign.assembly``) loads the checkpoint before decoding: into the main model, or,
where one backend serves several methods (``Resources(shared=True)``, ``personalign serve``), into a
second copy of the base model under the key ``"pdpo"``, so the main model the other methods decode
stays the base model.
NOTE: the loop's end-of-sequence ids come from the main model; a checkpoint trained with its own
``end_token_id`` (not the tokenizer's EOS) only stops there when it decodes on ``"main"``.

Naive reference (tested): for each row, recompute ``pi_p`` on ``[e_u | x | y_<t]`` from scratch every
step without a cache and take the argmax; greedy decoding through the loop yields the same tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from personalign.decoding.loaded import Loaded
from personalign.decoding.method import METHODS, DecodeState, TokenMethod
from personalign.personas.prompts import build_prompt_ids
from personalign.training.pdpo.user_fit import UserEmbedding
from personalign.training.user_model import UserIndex, UserModel, UserModelConfig, encode_user_text
from personalign.types import Request, ViewSpec
from personalign.views.base import Backend

__all__ = ["PDPOConfig", "PDPOMethod"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class PDPOConfig:
    """Per-request parameters of ``pdpo``.

    Attributes:
        user: the user's id (seen users get their embedding, others the generic e_0).
        user_text: the user's textual information u_t (demographics, stated preferences), or None.
        user_embedding: an implicit embedding fitted for a user the checkpoint never saw
            (``training.pdpo.user_fit``; a ``UserEmbedding`` or its ``to_dict`` form), used in place
            of the user's row; None: the row of ``user``.
    """

    user: str | int | None = None
    user_text: str | None = None
    user_embedding: Any = None

    def __post_init__(self) -> None:
        if isinstance(self.user, int) and not isinstance(self.user, bool):
            object.__setattr__(self, "user", str(self.user))  # ids in JSONL may be integers
        if self.user is not None and (not isinstance(self.user, str) or not self.user.strip()):
            raise ValueError(f"`user` must be a non-empty user id, got {self.user!r}.")
        if self.user_text is not None and not isinstance(self.user_text, str):
            raise ValueError(f"`user_text` must be a string, got {type(self.user_text).__name__}.")
        if self.user_embedding is not None:
            object.__setattr__(self, "user_embedding", UserEmbedding.from_dict(self.user_embedding))


@METHODS.register
class PDPOMethod(TokenMethod):
    """Decode a personalized LLM with each request's user embedding as a soft prompt."""

    name = "pdpo"
    Config = PDPOConfig
    requires = ("pdpo",)

    def __init__(self, config: PDPOConfig | None = None, *, users: UserModel | None = None,
                 index: UserIndex | None = None, model: str = "main", **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self.model = model  # the backend key of the personalized LLM
        if users is None:
            # the empty uniform user model: pi_p is the main model itself (vanilla DPO / no training)
            logger.warning("pdpo without a checkpoint: no user model, decoding the main model as is")
            users = UserModel(UserModelConfig(kind="uniform", user_tokens=0, hidden_size=1))
        self.users = users.eval()
        self.index = index if index is not None else UserIndex([])
        self._cache: dict[tuple[int | str, tuple[int, ...]], torch.Tensor | None] = {}

    @classmethod
    def from_resources(cls, config: PDPOConfig, loaded: Loaded) -> PDPOMethod:
        users, index, key = loaded.pdpo
        return cls(config, users=users, index=index, model=key)

    # -- decoding -------------------------------------------------------------------
    def resolve_user(self, request: Request, config: PDPOConfig) -> tuple[str | None, int]:
        """The request's user id and user-model row (0 for unknown users, logged once per id)."""
        if "user" in request.params or request.user is None:
            uid = config.user
        else:
            uid = request.user
        return uid, self.index.row(uid, strict=False) if uid is not None else 0

    def user_prefix(self, row: int, text_ids: tuple[int, ...], backend: Backend,
                    fitted: UserEmbedding | None = None) -> torch.Tensor | None:
        """The soft prompt e_u float [P, D] on the main model's device (cached), or None when empty:
        the user model's row ``row``, or the ``fitted`` embedding in its place, then the text."""
        key = (fitted.digest if fitted is not None else row, text_ids)
        if key not in self._cache:
            emb = backend.models[self.model].get_input_embeddings()
            if self.users.config.user_tokens and self.users.config.hidden_size != emb.weight.shape[1]:
                raise ValueError(
                    f"the user model has width {self.users.config.hidden_size}, the main model "
                    f"{emb.weight.shape[1]}: the checkpoint belongs to another base model."
                )
            if fitted is not None and fitted.shape != (self.users.config.user_tokens, emb.weight.shape[1]):
                raise ValueError(
                    f"`user_embedding` has shape {list(fitted.shape)}; this checkpoint's user embeddings are "
                    f"[{self.users.config.user_tokens}, {emb.weight.shape[1]}] (T_u, D)."
                )
            self.users.to(emb.weight.device)
            with torch.no_grad():
                if fitted is None:
                    e = self.users.prefixes(torch.tensor([row]), emb, [text_ids])[0].detach()
                else:
                    parts = [fitted.tensor.to(emb.weight.device, emb.weight.dtype)]
                    if text_ids:
                        parts.append(self.users.explicit(text_ids, emb).detach().to(emb.weight.dtype))
                    e = torch.cat(parts, 0)
            if len(self._cache) > 4096:  # fitted embeddings change with every choice: bound the cache
                self._cache.clear()
            self._cache[key] = e.to(emb.weight.dtype) if e.shape[0] else None
        return self._cache[key]

    def build_views(self, request: Request, config: PDPOConfig, backend: Backend, chat_template: bool) -> list[ViewSpec]:
        if self.model not in backend.models:
            raise ValueError(f"method 'pdpo' decodes the model key {self.model!r}, which the backend lacks "
                             f"({sorted(backend.models)}).")
        tok = backend.tokenizer(self.model)
        ids = build_prompt_ids(tok, request.prompt, chat_template=chat_template)
        _, row = self.resolve_user(request, config)
        fitted = config.user_embedding
        prefix = self.user_prefix(row, encode_user_text(tok, config.user_text), backend, fitted)
        role = f"user_row:{row}" if fitted is None else f"user_fitted:{fitted.digest}"
        return [ViewSpec(prompt_ids=ids, prefix_embeds=prefix, model=self.model, role=role)]

    def prepare(self, state: DecodeState, backend: Backend) -> None:
        for b, (req, cfg) in enumerate(zip(state.requests, state.configs)):
            uid, row = self.resolve_user(req, cfg)
            fitted = cfg.user_embedding
            state.row_stats(b).update(user=uid, user_row=row, user_known=row > 0,
                                      user_fitted_pairs=None if fitted is None else fitted.num_pairs)

    def combine(self, logprobs: torch.Tensor, state: DecodeState) -> torch.Tensor:
        return logprobs[:, 0]
