"""P-RLHF user models: a user's id and text -> a soft prompt ``e_u`` [P, D] for the LLM.

Paper: Li et al., "Personalized Language Modeling from Personalized Human Feedback" (P-RLHF),
Section 4.3, Examples 1-3, Figure 2.

``e_u = concat(f_im(u_p), f_ex(u_t))`` with

* implicit part ``f_im`` [T_u, D], from the user's row ``i`` (row 0 = unknown / new user):
  - ``uniform``    (Example 1): ``e_i = e`` for every i; ``T_u`` may be 0 (an empty tensor: vanilla RLHF);
  - ``individual`` (Example 2): ``e_0`` for row 0, ``e_i = e_0 + o_i`` for a seen user i >= 1;
  - ``cluster``    (Example 3): ``e_i = sum_k w'_ik V_k`` with K centres ``V`` [K, T_u, D] and one weight
    row ``w_i`` [K] per user (row 0 included); ``w' = softmax(w_i)`` (``softmax`` weighting, the
    authors' choice) or ``w' = w_i`` (``linear``, the plain ``V · w_i`` of Example 3);
* explicit part ``f_ex`` [T_text, D]: the user's text (demographics, stated preferences) embedded by
  the LLM's own input-embedding matrix; empty when the user has no text.

The soft prompt is prepended to the input embeddings of the prompt (before any BOS), exactly where
``ViewSpec.prefix_embeds`` puts it at generation time.

``UserIndex`` maps external user ids (strings) to rows 1..m; an unknown id is an error where the
caller asks for ``strict`` (training) and row 0 otherwise (generation falls back to the generic user).

NOTE: offsets ``o_i`` start at zero (every seen user starts at the generic embedding); ``e_0``, the
uniform embedding and the cluster centres start uniform in ``[-r, r]`` with ``r = sqrt(3) * s`` where
``s`` is the std of the LLM's input embeddings (the authors use a fixed ``r = 0.5``, far larger than
the token embeddings of small models); cluster weights start ``N(0, 1)`` as in the authors' code, and
``linear`` weights start at the softmax of that draw so both weightings begin at the same embeddings.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from personalign.config import check_choice, check_int, check_positive

__all__ = [
    "USER_MODEL_KINDS",
    "CLUSTER_WEIGHTINGS",
    "UserModelConfig",
    "UserModel",
    "UserIndex",
    "encode_user_text",
    "save_user_model",
    "load_user_model",
]

logger = logging.getLogger(__name__)

USER_MODEL_KINDS = ("uniform", "individual", "cluster")
CLUSTER_WEIGHTINGS = ("softmax", "linear")


@dataclass(frozen=True, kw_only=True)
class UserModelConfig:
    """Shape and kind of an implicit user model.

    Attributes:
        kind: ``uniform`` | ``individual`` | ``cluster`` (paper Examples 1-3).
        num_users: m, the number of seen users (rows 1..m; row 0 is the unknown user).
        hidden_size: D, the LLM's token-embedding width.
        user_tokens: T_u, soft-prompt tokens of the implicit embedding (0 only for ``uniform``).
        clusters: K, cluster centres (``cluster`` only).
        weighting: ``softmax`` | ``linear`` mixing of the centres (``cluster`` only).
        init_std: std of the initial embeddings (the LLM's input-embedding std when built by ``for_model``).
        seed: seed of the initial draw.
    """

    kind: str = "individual"
    num_users: int = 0
    hidden_size: int = 0
    user_tokens: int = 10
    clusters: int = 5
    weighting: str = "softmax"
    init_std: float = 0.02
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("user_model", self.kind, USER_MODEL_KINDS)
        check_int("num_users", self.num_users, 0)
        check_int("hidden_size", self.hidden_size, 1)
        check_int("user_tokens", self.user_tokens, 0, hint="T_u")
        if self.kind != "uniform" and self.user_tokens < 1:
            raise ValueError(
                f"`user_tokens` (T_u) must be >= 1 for a {self.kind!r} user model, got {self.user_tokens}; "
                "only the uniform model may be empty (T_u = 0, vanilla DPO)."
            )
        check_int("clusters", self.clusters, 1, hint="K")
        check_choice("weighting", self.weighting, CLUSTER_WEIGHTINGS)
        check_positive("init_std", self.init_std, allow_zero=True)


class UserModel(nn.Module):
    """Implicit user embeddings ``f_im`` plus the explicit text embeddings ``f_ex`` (module docstring)."""

    def __init__(self, config: UserModelConfig) -> None:
        super().__init__()
        self.config = config
        T, D, m, K = config.user_tokens, config.hidden_size, config.num_users, config.clusters
        g = torch.Generator().manual_seed(config.seed)
        r = math.sqrt(3.0) * config.init_std

        def uniform(*shape: int) -> nn.Parameter:
            return nn.Parameter((torch.rand(*shape, generator=g) * 2 - 1) * r)

        if config.kind == "uniform":
            self.shared = uniform(T, D)
        elif config.kind == "individual":
            self.generic = uniform(T, D)
            self.offsets = nn.Parameter(torch.zeros(m, T, D))
        else:
            self.centers = uniform(K, T, D)
            w = torch.randn(m + 1, K, generator=g)
            self.weights = nn.Parameter(w if config.weighting == "softmax" else torch.softmax(w, -1))

    @classmethod
    def for_model(cls, model: Any, **fields: Any) -> UserModel:
        """A user model sized for ``model`` (D and the initial scale from its input embeddings)."""
        emb = model.get_input_embeddings().weight
        fields.setdefault("hidden_size", int(emb.shape[1]))
        fields.setdefault("init_std", float(emb.detach().float().std()))
        return cls(UserModelConfig(**fields))

    @property
    def user_tokens(self) -> int:
        return self.config.user_tokens

    def _check_rows(self, rows: torch.Tensor) -> torch.Tensor:
        rows = torch.as_tensor(rows, dtype=torch.long)
        if rows.dim() != 1:
            raise ValueError(f"`rows` must be a 1-D tensor of user rows, got shape {tuple(rows.shape)}.")
        m = self.config.num_users
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) > m):
            raise ValueError(f"user rows must lie in 0..{m} (0 = unknown user), got {rows.tolist()}.")
        return rows

    def implicit(self, rows: torch.Tensor) -> torch.Tensor:
        """``f_im``: long [B] user rows -> float [B, T_u, D]."""
        rows = self._check_rows(rows)
        cfg = self.config
        if cfg.kind == "uniform":
            return self.shared[None].expand(rows.shape[0], -1, -1)
        if cfg.kind == "individual":
            dev = self.generic.device
            rows = rows.to(dev)
            base = self.generic[None].expand(rows.shape[0], -1, -1)
            known = rows > 0
            if not bool(known.any()):
                return base
            # only the offsets of the rows in the batch enter the graph (o_0 is identically 0)
            off = torch.zeros_like(base)
            off = off.index_put((known.nonzero()[:, 0],), self.offsets[rows[known] - 1])
            return base + off
        w = self.weights[rows.to(self.weights.device)]  # [B, K]
        if cfg.weighting == "softmax":
            w = torch.softmax(w, -1)
        return torch.einsum("bk,ktd->btd", w, self.centers)

    def explicit(self, text_ids: Sequence[int], input_embeddings: nn.Module) -> torch.Tensor:
        """``f_ex``: the user's text ids -> float [T_text, D], the LLM's own input embeddings."""
        weight = input_embeddings.weight
        if not text_ids:
            return weight.new_zeros(0, weight.shape[1])
        ids = torch.tensor(list(text_ids), dtype=torch.long, device=weight.device)
        return input_embeddings(ids)

    def prefixes(
        self,
        rows: torch.Tensor,
        input_embeddings: nn.Module,
        text_ids: Sequence[Sequence[int] | None] | None = None,
    ) -> list[torch.Tensor]:
        """The soft prompt of each row: ``concat(f_im(row), f_ex(text))``, a list of B float [P_b, D]."""
        imp = self.implicit(rows)
        dtype = input_embeddings.weight.dtype
        out = []
        for b in range(imp.shape[0]):
            parts = [imp[b].to(dtype)]
            ids = text_ids[b] if text_ids is not None else None
            if ids:
                parts.append(self.explicit(ids, input_embeddings).to(imp.device))
            out.append(torch.cat(parts, 0))
        return out

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.implicit(rows)


def encode_user_text(tokenizer: Any, text: str | None) -> tuple[int, ...]:
    """Token ids of a user's text for ``f_ex`` (no special tokens); ``()`` for no text."""
    if text is None or not str(text).strip():
        return ()
    return tuple(int(t) for t in tokenizer(str(text).strip(), add_special_tokens=False)["input_ids"])


class UserIndex:
    """External user ids -> user-model rows 1..m (row 0 is the unknown / new user)."""

    def __init__(self, user_ids: Iterable[Any]) -> None:
        ids = [str(u) for u in user_ids]
        for u in ids:
            if not u.strip():
                raise ValueError("user ids must be non-empty strings, got an empty one.")
        dupes = sorted({u for u in ids if ids.count(u) > 1})
        if dupes:
            raise ValueError(f"user ids must be unique, got duplicates {dupes[:5]}.")
        self.ids = ids
        self._rows = {u: i + 1 for i, u in enumerate(ids)}
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, user_id: Any) -> bool:
        return user_id is not None and str(user_id) in self._rows

    def row(self, user_id: Any, *, strict: bool) -> int:
        """The row of ``user_id``; unknown -> ``ValueError`` if ``strict`` else 0 (logged once per id)."""
        if user_id is not None and str(user_id) in self._rows:
            return self._rows[str(user_id)]
        if strict:
            known = ", ".join(self.ids[:8]) + (" ..." if len(self.ids) > 8 else "")
            raise ValueError(f"`user_id` {user_id!r} is not in the user index ({len(self)} users: {known}).")
        key = str(user_id)
        if key not in self._warned:
            self._warned.add(key)
            logger.warning("user %r is unknown to the user model; using the generic user embedding e_0 (row 0)",
                           user_id)
        return 0

    def rows(self, user_ids: Sequence[Any], *, strict: bool) -> torch.Tensor:
        return torch.tensor([self.row(u, strict=strict) for u in user_ids], dtype=torch.long)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"rows": {u: r for u, r in self._rows.items()}}, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> UserIndex:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"user-id index {str(p)!r} does not exist.")
        try:
            rows = json.loads(p.read_text())["rows"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"user-id index {str(p)!r} must be JSON {{'rows': {{id: row}}}}: {e}") from e
        order = sorted(rows.items(), key=lambda kv: kv[1])
        if [r for _, r in order] != list(range(1, len(order) + 1)):
            raise ValueError(f"user-id index {str(p)!r} must number its users 1..m.")
        return cls([u for u, _ in order])


def save_user_model(model: UserModel, directory: str | Path) -> None:
    """Write ``user_model.json`` (config) and ``user_model.safetensors`` (parameters) to ``directory``."""

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "user_model.json").write_text(json.dumps(asdict(model.config), indent=1))
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              str(d / "user_model.safetensors"))


def load_user_model(directory: str | Path) -> UserModel:
    """The user model saved by ``save_user_model`` (float32, on the CPU)."""

    d = Path(directory)
    cfg_path, w_path = d / "user_model.json", d / "user_model.safetensors"
    if not cfg_path.is_file() or not w_path.is_file():
        raise ValueError(f"{str(d)!r} holds no user model (user_model.json + user_model.safetensors).")
    model = UserModel(UserModelConfig(**json.loads(cfg_path.read_text())))
    model.load_state_dict(load_file(str(w_path)))
    return model
