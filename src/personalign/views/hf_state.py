"""The state of one decoding batch on ``views.hf.HFBackend``, and the edits rows make to it between
steps: ``release_rows`` (finished requests leave every cache) and ``truncate_rows`` (rows roll back
to a shorter prefix, e.g. a rejected draft). Layout: ``views.hf``'s module docstring."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from personalign.types import ViewSpec
from personalign.views.merge import cache_layers, select_cache_rows, set_cache_layers

__all__ = ["Group", "HFViewState", "release_rows", "truncate_rows", "groups_of", "compact"]


@dataclass
class Group:
    """Views advanced together in one cache: the rows of ``views`` for every live request."""

    model: str
    views: list[int]  # view indices k held by this group, in row order
    cache: Any
    mask: torch.Tensor  # long [R, S]; R = live requests x len(views), b-major
    next_pos: torch.Tensor  # long [R]
    hidden: torch.Tensor | None = None  # [R, D] output-head input at each row's last fed position


@dataclass
class HFViewState:
    """Per-batch state: one group per independently advanced set of views."""

    batch_size: int
    num_views: int
    groups: list[Group]
    view_group: list[tuple[int, int]]  # view k -> (group index, slot within group)
    last_logprobs: torch.Tensor  # float32 [B, K, V]
    fed: torch.Tensor  # long [B, K]
    specs: list[list[ViewSpec]] = field(default_factory=list)
    live: torch.Tensor | None = None  # bool [B] (cpu): requests whose rows are in the caches

    def __post_init__(self) -> None:
        if self.live is None:
            self.live = torch.ones(self.batch_size, dtype=torch.bool)

    def cache_length(self) -> int:
        """Total cache columns over groups (holes included); for tests and stats."""
        return sum(int(g.mask.shape[1]) for g in self.groups)

    def live_rows(self) -> torch.Tensor:
        """long [B_live]: indices of the requests still held in the caches."""
        return torch.nonzero(self.live).flatten()

    def last_hidden(self, k: int) -> torch.Tensor:
        """float [B, D]: the output head's input at view ``k``'s last fed position (models that expose
        ``last_hidden``, e.g. ``RowAdapterModel``); zeros for released requests."""
        gi, slot = self.view_group[k]
        g = self.groups[gi]
        if g.hidden is None:
            raise ValueError(f"view {k} ({g.model!r}) has no hidden state: its model does not expose `last_hidden`.")
        n = len(g.views)
        h = g.hidden.view(-1, n, g.hidden.shape[-1])[:, slot]
        if bool(self.live.all()):
            return h
        out = h.new_zeros(self.batch_size, h.shape[-1])
        out[self.live_rows().to(h.device)] = h
        return out


def release_rows(state: HFViewState, rows: Sequence[int]) -> None:
    """Drop requests ``rows`` from every cache of ``state``: later steps skip them (``HFBackend.step``).

    Frees their cache rows at once (one row-gather per cache) and drops the columns no kept row
    attends to (positions are explicit, so removing masked columns changes nothing), so a batch
    whose long rows ended costs only what its running rows need.
    """
    rows = sorted({int(b) for b in rows})
    if any(b < 0 or b >= state.batch_size for b in rows):
        raise ValueError(f"`rows` must be request indices in 0..{state.batch_size - 1}, got {rows}.")
    gone = [b for b in rows if bool(state.live[b])]
    if not gone:
        return
    old_live = state.live_rows().tolist()
    state.live[gone] = False
    keep_req = [i for i, b in enumerate(old_live) if bool(state.live[b])]
    for g in state.groups:
        n = len(g.views)
        idx = torch.tensor([i * n + j for i in keep_req for j in range(n)], dtype=torch.long,
                           device=g.mask.device)
        select_cache_rows(g.cache, idx)
        g.mask, g.next_pos = g.mask[idx], g.next_pos[idx]
        if g.hidden is not None:
            g.hidden = g.hidden[idx.to(g.hidden.device)]
        used = g.mask.any(0)
        if idx.numel() and not bool(used.all()):  # columns no kept row attends to (a long prompt that left)
            cols = torch.nonzero(used).flatten()
            set_cache_layers(g.cache, [(k[:, :, cols.to(k.device)], v[:, :, cols.to(v.device)])
                                       for k, v in cache_layers(g.cache)])
            g.mask = g.mask[:, cols]


def groups_of(state: HFViewState, selected: list[int]) -> list[int]:
    if not selected or any(k < 0 or k >= state.num_views for k in selected):
        raise ValueError(f"`views` must be indices in 0..{state.num_views - 1}, got {selected}.")
    gids = sorted({state.view_group[k][0] for k in selected})
    for gi in gids:
        if not set(state.groups[gi].views) <= set(selected):
            raise ValueError(
                f"views {state.groups[gi].views} share one cache (a prefill group) and advance together; "
                f"select all of them or none, got {selected}."
            )
    return gids


def compact(g: Group) -> None:
    """Crop cache columns that are masked in every row at the right end."""
    live = g.mask.any(0)
    if bool(live[-1]):
        return
    nz = torch.nonzero(live)
    keep = int(nz[-1]) + 1 if nz.numel() else 0
    drop = g.mask.shape[1] - keep
    if drop > 0:
        g.cache.crop(-drop)
        g.mask = g.mask[:, :keep]

# ------------------------------------------------------------------ truncate


def truncate_rows(state: HFViewState, keep: torch.Tensor, views: Sequence[int] | None = None) -> None:
    """Roll back: request ``b`` keeps its first ``keep[b]`` fed tokens in the selected views.

    The dropped columns become holes (masked) and positions rewind, so the next token fed lands
    exactly where it would after a fresh prefill of the kept text. The next-token log-probs of a
    rolled-back row are unknown until a token is fed: they are set to NaN.
    """
    keep = keep.long().cpu()
    if keep.shape != (state.batch_size,) or bool((keep < 0).any()):
        raise ValueError(f"`keep` must be {state.batch_size} non-negative counts, got {keep.tolist()}.")
    selected = list(range(state.num_views)) if views is None else list(views)
    for gi in groups_of(state, selected):
        g = state.groups[gi]
        fed = state.fed[:, g.views]  # [B, n]
        new = torch.where(state.live[:, None], torch.minimum(fed, keep[:, None]), fed)  # released rows stay
        drop_all = fed - new  # [B, n]
        drop = drop_all[state.live].reshape(-1).to(g.mask.device)  # [R] over live rows
        if not bool((drop > 0).any()):
            continue
        # number of real tokens at or right of each column; drop the last `drop[r]` of them
        from_right = g.mask.flip(1).cumsum(1).flip(1)
        kill = (g.mask == 1) & (from_right <= drop[:, None])
        g.mask = g.mask.masked_fill(kill, 0)
        g.next_pos = g.next_pos - drop
        state.fed[:, g.views] = new
        rolled = (drop_all > 0).to(state.last_logprobs.device)
        lp = state.last_logprobs[:, g.views]
        state.last_logprobs[:, g.views] = lp.masked_fill(rolled[..., None], float("nan"))
        compact(g)
