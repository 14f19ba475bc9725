"""Transformers backend: every view of every request advanced by one batched, cached forward.

Layout. The views of each *group* (by default: all views that use the same model) are flattened
b-major into ``R = B * K_group`` rows of one batch with one ``DynamicCache``. Each row keeps its own
2-D attention mask over cache columns and its own next position id, so rows of different lengths
share the batch:

* prompts are left-padded (mask 0, position ids counted over real tokens only);
* a token prefix common to all rows of a group is prefilled once at batch size 1 and repeated, the
  rest of each prompt following after a run of masked columns (``[shared | pad | own suffix]``);
* a ragged step (rows feeding different numbers of tokens) masks the unused columns;
* ``truncate`` masks the last real columns of chosen rows ("holes") and rewinds their positions;
  columns masked in every row at the right end are cropped from the cache.

Masked columns never receive attention, and position ids are explicit, so every row computes what it
would compute alone (up to float rounding in batched matmuls).

Rows come and go between steps:

* ``release(state, rows)`` drops finished requests' rows from every cache (a batch shrinks as its
  rows end; later steps neither compute nor store them);
* ``step_many(calls)`` serves several states' steps (different batches, methods, view layouts,
  numbers of fed tokens) with ONE forward per model: the groups' caches are right-aligned into one
  batch (shorter ones padded with masked columns), run together, and split back (``views.merge``).
  A server decodes every running request, whatever its method, this way, and a request that arrives
  mid-decode joins the next forward.

Scoring known texts without a cache (``sequence_logprobs``) is ``views.teacher``'s job; the backend
only batches it and counts its forwards.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from personalign.types import ViewSpec
from personalign.views.cache import new_cache
from personalign.views.hf_models import (
    cache_kwarg,
    can_share_prefix,
    check_same_tokenizer,
    context_length,
    takes_additive_mask,
)
from personalign.views.hf_state import Group, HFViewState, compact, groups_of, release_rows, truncate_rows
from personalign.views.linears import DecodeLinears, from_env
from personalign.views.masks import attention_layout, decode_mask, sliding_masks
from personalign.views.merge import (
    join_caches,
    mergeable,
    split_cache,
)
from personalign.views.teacher import teacher_forced_logprobs

__all__ = ["HFBackend", "HFViewState", "check_same_tokenizer"]

logger = logging.getLogger(__name__)


@dataclass
class _Feed:
    """One group's share of a step: ``ids`` long [R, L] for its live rows, ``row_len`` long [R]."""

    group: Group
    ids: torch.Tensor
    row_len: torch.Tensor
    full: bool  # every row feeds all L columns
    lp: torch.Tensor | None = None  # float32 [R, L, V] after the forward


@dataclass
class _StepPlan:
    state: HFViewState
    B: int
    L: int
    lengths: torch.Tensor  # long [B] (cpu)
    live: torch.Tensor | None  # long [B_live] (cpu): the live requests; None when all are
    live_len: torch.Tensor  # long [B_live]: ``lengths`` of the live requests
    selected: list[int]
    feeds: list[tuple[int, _Feed | None]]  # (group index, feed or None when no live row feeds)


class HFBackend:
    """Backend over one or more Hugging Face causal LMs that share a tokenizer.

    Args:
        models: model key -> ``PreTrainedModel`` (a single model becomes ``{"main": model}``).
        tokenizers: model key -> tokenizer (or a single tokenizer shared by all).
        share_prefix: prefill a token prefix common to all rows of a group once.
        decode_linears: the tuned linear path of decode steps (``views.linears``): a ``DecodeLinears``,
            True for one with the defaults, False for the stock ``nn.Linear`` everywhere; None (the
            default) follows ``PERSONALIGN_DECODE_LINEARS`` (``views.linears.from_env``) and is
            otherwise True when a model runs on the CPU (the few-row products the path exists for).
    """

    def __init__(
        self,
        models: Mapping[str, Any] | Any,
        tokenizers: Mapping[str, Any] | Any,
        *,
        share_prefix: bool = True,
        decode_linears: DecodeLinears | bool | None = None,
    ) -> None:
        if not isinstance(models, Mapping):
            models = {"main": models}
        if not isinstance(tokenizers, Mapping):
            tokenizers = dict.fromkeys(models, tokenizers)
        if not models:
            raise ValueError("`models` must hold at least one model.")
        missing = [k for k in models if k not in tokenizers]
        if missing:
            raise ValueError(f"no tokenizer given for model(s) {missing}.")
        self.models = dict(models)
        self._tokenizers = {k: tokenizers[k] for k in self.models}
        keys = list(self.models)
        for k in keys[1:]:
            check_same_tokenizer(self._tokenizers[keys[0]], self._tokenizers[k], keys[0], k)
        self.share_prefix = share_prefix
        # Embedding matrices are often rounded up past the tokenizer: cut to the tokenizer length.
        self.vocab_size = len(self._tokenizers[keys[0]])
        for k, m in self.models.items():
            n_out = m.get_output_embeddings().weight.shape[0]
            if n_out < self.vocab_size:
                raise ValueError(
                    f"model {k!r} has {n_out} output rows but its tokenizer has {self.vocab_size} tokens."
                )
        self._cache_kw = {k: cache_kwarg(m) for k, m in self.models.items()}
        self._additive_mask = {k: takes_additive_mask(m) for k, m in self.models.items()}
        self._layout = {k: attention_layout(m, k) for k, m in self.models.items()}
        if decode_linears is None:
            decode_linears = from_env()
        if decode_linears is None:
            decode_linears = any(next(m.parameters()).device.type == "cpu" for m in self.models.values())
        self.linears: DecodeLinears | None = (
            decode_linears if isinstance(decode_linears, DecodeLinears) else DecodeLinears() if decode_linears else None)
        self.forward_count = 0  # model forwards run since construction (stats, tests)

    def add_model(self, key: str, model: Any, tokenizer: Any | None = None, *, replace: bool = False) -> None:
        """Register one more model under ``key`` (same checks as the constructor).

        ``tokenizer`` defaults to the main tokenizer; ``replace`` allows swapping an existing key for
        a module that computes the same function (e.g. a wrapper over the same weights).
        """
        if key in self.models and not replace:
            raise ValueError(f"model key {key!r} is already registered; pass replace=True to swap it.")
        first = next(iter(self._tokenizers))
        tok = tokenizer if tokenizer is not None else self._tokenizers[first]
        check_same_tokenizer(self._tokenizers[first], tok, first, key)
        n_out = model.get_output_embeddings().weight.shape[0]
        if n_out < self.vocab_size:
            raise ValueError(f"model {key!r} has {n_out} output rows but its tokenizer has {self.vocab_size} tokens.")
        self.models[key] = model
        self._tokenizers[key] = tok
        self._cache_kw[key] = cache_kwarg(model)
        self._additive_mask[key] = takes_additive_mask(model)
        self._layout[key] = attention_layout(model, key)

    # ------------------------------------------------------------------ helpers
    def tokenizer(self, model: str = "main") -> Any:
        if model not in self._tokenizers:
            raise ValueError(f"unknown model key {model!r}; this backend holds {sorted(self.models)}.")
        return self._tokenizers[model]

    def device(self, model: str = "main") -> torch.device:
        return next(self.models[model].parameters()).device

    def context_length(self, model: str = "main") -> int | None:
        return context_length(self.models[model])

    def _pad_id(self, model: str) -> int:
        tok = self._tokenizers[model]
        for tid in (tok.pad_token_id, tok.eos_token_id):
            if tid is not None:
                return int(tid)
        return 0

    @torch.inference_mode()
    def _forward(self, model: str, cache: Any, mask: torch.Tensor, pos: torch.Tensor, keep: int, *,
                 ids: torch.Tensor | None = None, embeds: torch.Tensor | None = None,
                 decode: bool = False) -> torch.Tensor:
        """One model forward; returns float32 log-probs [R, keep, V] of the last ``keep`` columns.
        ``decode``: a step (not a prefill), whose linears run the tuned path when it is on."""
        self.forward_count += 1
        fed = ids if ids is not None else embeds
        rows, width = fed.shape[:2]
        if decode and self.linears is not None and rows * width <= self.linears.max_rows and \
                fed.device.type == "cpu":  # the few-row quirks are the CPU's
            with self.linears.active(self.models[model], rows * width):
                return self._run_model(model, cache, mask, pos, keep, rows, width, ids, embeds)
        return self._run_model(model, cache, mask, pos, keep, rows, width, ids, embeds)

    def _run_model(self, model: str, cache: Any, mask: torch.Tensor, pos: torch.Tensor, keep: int, rows: int,
                   width: int, ids: torch.Tensor | None, embeds: torch.Tensor | None) -> torch.Tensor:
        attn = self._attention_mask(model, mask, pos)
        # the last `keep` of `width` columns: as a slice, the output head's input is a strided view,
        # which a batched matrix product then multiplies by the whole head once per row; as indices it
        # is a contiguous copy and one matrix product (a 3-row prefill of SmolLM2: 15 ms -> 5 ms)
        kept: int | torch.Tensor = keep
        if rows > 1 and width > keep:
            kept = torch.arange(width - keep, width, device=mask.device)
        out = self.models[model](
            input_ids=ids,
            inputs_embeds=embeds,
            attention_mask=attn,
            position_ids=pos,
            use_cache=True,
            logits_to_keep=kept,
            **{self._cache_kw[model]: cache},
        )
        lp = torch.log_softmax(out.logits[..., : self.vocab_size].float(), dim=-1)
        if lp.shape[0] != rows:  # the model ran its output head on some rows only (hidden-state views)
            full = lp.new_full((rows, *lp.shape[1:]), -math.log(self.vocab_size))
            full[self.models[model].logit_rows(rows, lp.device)] = lp
            lp = full
        return lp

    def _attention_mask(self, model: str, mask: torch.Tensor, pos: torch.Tensor) -> Any:
        """What ``model`` gets as ``attention_mask`` for rows with cache mask ``mask`` [R, S] (the new
        columns included) feeding positions ``pos`` [R, L] (``views.masks``): the 2-D mask, a prepared
        additive mask for a padded one-token step, or per-row 4-D masks for sliding layers."""
        layout = self._layout[model]
        if layout.sliding:
            return sliding_masks(layout, mask, pos, self.models[model].get_input_embeddings().weight.dtype)
        if pos.shape[1] == 1 and self._additive_mask[model] and not bool(mask.all()):
            return self._decode_mask(model, mask)
        return mask

    def _decode_mask(self, model: str, mask: torch.Tensor) -> torch.Tensor:
        """The 2-D mask of a one-token step as the additive 4-D mask ``[R, 1, 1, S]`` attention adds.

        Given the 2-D mask, transformers hands SDPA a boolean mask, which PyTorch's CPU kernel turns
        into an additive one again in every layer (two ops per layer and step); built once here, the
        mask is used as is by every layer (transformers passes a 4-D mask through untouched).
        """
        return decode_mask(mask, self.models[model].get_input_embeddings().weight.dtype)

    # ------------------------------------------------------------------ prefill
    def prefill(
        self, views: Sequence[Sequence[ViewSpec]], groups: Sequence[Sequence[int]] | None = None
    ) -> HFViewState:
        """Encode every view's prompt. ``views[b][k]`` is view k of request b (K equal for all b).

        Args:
            views: B lists of K view specs.
            groups: optional partition of view indices into independently advanced groups; each
                group must use a single model. Default: one group per model.
        """
        if not views:
            raise ValueError("`views` must hold at least one request.")
        B, K = len(views), len(views[0])
        if K == 0 or any(len(v) != K for v in views):
            raise ValueError(f"every request needs the same number of views (>= 1), got {[len(v) for v in views]}.")
        for k in range(K):
            models = {views[b][k].model for b in range(B)}
            if len(models) != 1:
                raise ValueError(f"view {k} uses different models across requests: {sorted(models)}.")
            (m,) = models
            if m not in self.models:
                raise ValueError(f"view {k} names model {m!r}; this backend holds {sorted(self.models)}.")
        if groups is None:
            by_model: dict[str, list[int]] = {}
            for k in range(K):
                by_model.setdefault(views[0][k].model, []).append(k)
            groups = list(by_model.values())
        flat = sorted(k for g in groups for k in g)
        if flat != list(range(K)):
            raise ValueError(f"`groups` must partition the views 0..{K - 1}, got {groups}.")
        for g in groups:
            if len({views[0][k].model for k in g}) != 1:
                raise ValueError(f"group {list(g)} mixes models; a group is advanced by one forward of one model.")
        for b in range(B):
            for k in range(K):
                spec, ctx = views[b][k], self.context_length(views[b][k].model)
                if ctx is not None and spec.length >= ctx:
                    raise ValueError(
                        f"prompt of request {b} (view {k}, {spec.role or 'unnamed'}) is {spec.length} tokens; "
                        f"the model's context is {ctx} tokens."
                    )

        state_groups, view_group = [], [(0, 0)] * K
        last = torch.empty(B, K, self.vocab_size)
        for gi, g in enumerate(groups):
            g = list(g)
            model = views[0][g[0]].model
            rows = [views[b][k] for b in range(B) for k in g]
            group, lp = self._prefill_group(model, g, rows)
            state_groups.append(group)
            for j, k in enumerate(g):
                view_group[k] = (gi, j)
            last = last.to(lp.device)
            last[:, g] = lp.view(B, len(g), -1)
        return HFViewState(
            batch_size=B,
            num_views=K,
            groups=state_groups,
            view_group=view_group,
            last_logprobs=last,
            fed=torch.zeros(B, K, dtype=torch.long),
            specs=[list(v) for v in views],
        )

    def _prefill_group(self, model: str, view_ids: list[int], rows: list[ViewSpec]) -> tuple[Group, torch.Tensor]:
        dev = self.device(model)
        R = len(rows)
        cache = new_cache(self.models[model])
        lengths = torch.tensor([r.length for r in rows], dtype=torch.long)
        has_embeds = any(r.prefix_embeds is not None for r in rows)
        shared = 0
        if self.share_prefix and R > 1 and not has_embeds and can_share_prefix(self.models[model]):
            shared = min(_common_prefix_len([r.prompt_ids for r in rows]), int(lengths.min()) - 1)
        if shared > 0:
            ids0 = torch.tensor([rows[0].prompt_ids[:shared]], device=dev)
            self._forward(model, cache, torch.ones_like(ids0), torch.arange(shared, device=dev)[None], 1, ids=ids0)
            cache.batch_repeat_interleave(R)
        own = lengths - shared
        W = int(own.max())
        col = torch.arange(W)
        new_mask = (col[None, :] >= (W - own)[:, None]).long()  # right-aligned own tokens
        pos = (shared + new_mask.cumsum(1) - 1).clamp(min=0)
        mask = torch.cat([torch.ones(R, shared, dtype=torch.long), new_mask], 1)
        if has_embeds:
            embeds = self._row_embeds(model, rows, W)
            lp = self._forward(model, cache, mask.to(dev), pos.to(dev), 1, embeds=embeds)
        else:
            ids = torch.full((R, W), self._pad_id(model), dtype=torch.long)
            for r, spec in enumerate(rows):
                n = int(own[r])
                ids[r, W - n :] = torch.tensor(spec.prompt_ids[shared:], dtype=torch.long)
            lp = self._forward(model, cache, mask.to(dev), pos.to(dev), 1, ids=ids.to(dev))
        hidden = self._last_hidden(model)
        group = Group(model=model, views=view_ids, cache=cache, mask=mask.to(dev), next_pos=lengths.to(dev),
                       hidden=None if hidden is None else hidden[:, -1])
        return group, lp[:, -1]

    def _row_embeds(self, model: str, rows: list[ViewSpec], width: int) -> torch.Tensor:
        emb = self.models[model].get_input_embeddings()
        dev, dtype = emb.weight.device, emb.weight.dtype
        out = torch.zeros(len(rows), width, emb.weight.shape[1], device=dev, dtype=dtype)
        with torch.inference_mode():
            for r, spec in enumerate(rows):
                parts = []
                if spec.prefix_embeds is not None:
                    if spec.prefix_embeds.shape[1] != emb.weight.shape[1]:
                        raise ValueError(
                            f"`prefix_embeds` has width {spec.prefix_embeds.shape[1]}, model {model!r} "
                            f"expects {emb.weight.shape[1]}."
                        )
                    parts.append(spec.prefix_embeds.to(dev, dtype))
                if spec.prompt_ids:
                    parts.append(emb(torch.tensor(spec.prompt_ids, device=dev)))
                e = torch.cat(parts, 0)
                out[r, width - e.shape[0] :] = e
        return out

    # ------------------------------------------------------------------ step
    def step(
        self,
        state: HFViewState,
        tokens: torch.Tensor,
        lengths: torch.Tensor | None = None,
        views: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Feed ``tokens`` long [B, L] to the selected views (or [B, K_sel, L]: each view its own
        tokens, in the order of ``views``); returns float32 log-probs [B, K_sel, L, V].

        Rows of released requests are neither fed nor computed; their outputs are uniform (−log V), so
        a method's arithmetic on them stays finite.
        """
        return self.step_many([(state, tokens, lengths, views)])[0]

    def step_many(
        self, calls: Sequence[tuple[HFViewState, torch.Tensor, torch.Tensor | None, Sequence[int] | None]]
    ) -> list[torch.Tensor]:
        """Serve several ``step(state, tokens, lengths, views)`` calls with one forward per model.

        The calls may come from different batches (states), methods and view layouts, and feed
        different numbers of tokens: each model runs once over the rows of every group it holds,
        padded to the widest call (extra columns masked, then cropped). Each call gets exactly what
        ``step`` alone would return, up to float rounding in batched matmuls. A state may appear in
        several calls only if they select disjoint groups.
        """
        plans = [self._plan_step(*call) for call in calls]
        by_model: dict[str, list[_Feed]] = {}
        seen: set[int] = set()
        for plan in plans:
            for _, feed in plan.feeds:
                if feed is None:
                    continue
                if id(feed.group) in seen:
                    raise ValueError("`step_many` got two calls that feed the same cache group in one forward.")
                seen.add(id(feed.group))
                by_model.setdefault(feed.group.model, []).append(feed)
        for model, feeds in by_model.items():
            if len(feeds) > 1 and not all(mergeable(f.group.cache) for f in feeds):
                for f in feeds:  # caches that cannot be joined: one forward each
                    self._run_feeds(model, [f])
            else:
                self._run_feeds(model, feeds)
        return [self._finish_step(plan) for plan in plans]

    def _plan_step(self, state: HFViewState, tokens: torch.Tensor, lengths: torch.Tensor | None,
                   views: Sequence[int] | None) -> _StepPlan:
        """Validate one step call and cut it into per-group feeds of the live rows."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() not in (2, 3):
            raise ValueError("`tokens` must be a long tensor [B, L] or [B, K_sel, L].")
        per_view = tokens.dim() == 3
        B, L = tokens.shape[0], tokens.shape[-1]
        if state.batch_size != B:
            raise ValueError(f"`tokens` has {B} rows, the state holds {state.batch_size} requests.")
        if L < 1:
            raise ValueError("`tokens` must hold at least one column.")
        lengths = torch.full((B,), L, dtype=torch.long) if lengths is None else lengths.long().cpu()
        if bool((lengths < 0).any()) or bool((lengths > L).any()):
            raise ValueError(f"`lengths` must lie in [0, {L}], got {lengths.tolist()}.")
        selected = list(range(state.num_views)) if views is None else list(views)
        gids = groups_of(state, selected)
        if per_view and tokens.shape[1] != len(selected):
            raise ValueError(f"per-view `tokens` must be [B, {len(selected)}, L] for views {selected}, "
                             f"got {tuple(tokens.shape)}.")
        all_live = bool(state.live.all())
        live = None if all_live else state.live_rows()
        tokens = tokens.long() if all_live else tokens.long()[live]
        live_len = lengths if all_live else lengths[live]
        feeds: list[tuple[int, _Feed | None]] = []
        for gi in gids:
            g = state.groups[gi]
            n = len(g.views)
            if live_len.numel() == 0 or not bool((live_len > 0).any()):
                feeds.append((gi, None))
                continue
            dev = g.mask.device
            if per_view:  # rows are b-major over the group's views
                ids = tokens[:, [selected.index(k) for k in g.views]].to(dev).reshape(-1, L)
            else:
                ids = tokens.to(dev).repeat_interleave(n, dim=0) if n > 1 else tokens.to(dev)  # [R, L]
            full = bool((live_len == L).all())
            row_len = live_len.repeat_interleave(n).to(dev)
            feeds.append((gi, _Feed(group=g, ids=ids, row_len=row_len, full=full)))
        return _StepPlan(state=state, B=B, L=L, lengths=lengths, live=live, live_len=live_len, selected=selected,
                         feeds=feeds)

    def _run_feeds(self, model: str, feeds: list[_Feed]) -> None:
        """One forward of ``model`` over every feed's rows; sets ``feed.lp`` and updates the groups."""
        L = max(int(f.ids.shape[1]) for f in feeds)
        dev = feeds[0].group.mask.device
        col = torch.arange(L, device=dev)
        pos_parts, ids_parts, widths = [], [], []
        for f in feeds:
            g = f.group
            width = int(f.ids.shape[1])
            widths.append(width)
            if width < L:  # a narrower call in a wider forward: its extra columns are masked
                f.ids = torch.cat([f.ids, f.ids.new_full((f.ids.shape[0], L - width), self._pad_id(model))], 1)
                f.full = False
            pos_parts.append(g.next_pos[:, None] + col[None, :])
            if f.full:
                g.mask = torch.cat([g.mask, g.mask.new_ones(g.mask.shape[0], L)], 1)
            else:
                g.mask = torch.cat([g.mask, (col[None, :] < f.row_len[:, None]).long()], 1)
            g.next_pos = g.next_pos + f.row_len
            ids_parts.append(f.ids)
        if len(feeds) == 1:
            g = feeds[0].group
            lp = self._forward(model, g.cache, g.mask, pos_parts[0], L, ids=ids_parts[0], decode=True)
            hidden = self._last_hidden(model)
        else:
            lp, hidden = self._merged_forward(model, feeds, torch.cat(pos_parts), torch.cat(ids_parts), L)
        r0 = 0
        for f, width in zip(feeds, widths):
            r1 = r0 + int(f.ids.shape[0])
            f.lp = lp[r0:r1, :width]
            if hidden is not None:  # the output head's input at each row's last real position
                h = hidden[r0:r1]
                last = h[torch.arange(r1 - r0, device=h.device), (f.row_len - 1).clamp(min=0).to(h.device)]
                prev = f.group.hidden
                f.group.hidden = last if prev is None or f.full else torch.where(
                    (f.row_len > 0).to(h.device)[:, None], last, prev.to(last.dtype))
            else:
                f.group.hidden = None
            if not f.full:
                compact(f.group)
            r0 = r1

    def _last_hidden(self, model: str) -> torch.Tensor | None:
        """float [R, keep, D] of the model's last forward, for models that keep it (else None)."""
        return getattr(self.models[model], "last_hidden", None)

    def _merged_forward(self, model: str, feeds: list[_Feed], pos: torch.Tensor, ids: torch.Tensor, L: int
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Right-align the feeds' caches into one batch, run one forward, and split the caches back."""
        widths = [int(f.group.mask.shape[1]) - L for f in feeds]  # cache columns before this step
        S = max(widths)
        masks = [torch.nn.functional.pad(f.group.mask, (S - w, 0)) for f, w in zip(feeds, widths)]
        try:
            cache = join_caches(self.models[model], [f.group.cache for f in feeds], widths)
        except ValueError as e:
            raise ValueError(f"model {model!r}: {e}") from e
        lp = self._forward(model, cache, torch.cat(masks), pos, L, ids=ids, decode=True)
        hidden = self._last_hidden(model)
        split_cache(cache, [f.group.cache for f in feeds], [int(f.ids.shape[0]) for f in feeds], widths)
        return lp, hidden

    def _finish_step(self, plan: _StepPlan) -> torch.Tensor:
        """Scatter the feeds' log-probs back to ``[B, K_sel, L, V]`` and advance the state's counters."""
        state, B, L, lengths, live = plan.state, plan.B, plan.L, plan.lengths, plan.live
        all_live = live is None
        per_group: list[tuple[list[int], torch.Tensor]] = []
        for gi, feed in plan.feeds:
            g = state.groups[gi]
            n = len(g.views)
            if feed is None:  # nothing fed: no forward, no new columns
                lp = torch.full((B, n, L, self.vocab_size), -math.log(self.vocab_size),
                                device=state.last_logprobs.device)
                per_group.append((g.views, lp))
                continue
            lp_live = feed.lp.reshape(-1, n, L, feed.lp.shape[-1]).to(state.last_logprobs.device)
            if all_live:
                lp = lp_live
            else:
                lp = lp_live.new_full((B, n, L, lp_live.shape[-1]), -math.log(self.vocab_size))
                lp[live.to(lp.device)] = lp_live
            per_group.append((g.views, lp))
            dev_out = lp.device
            if feed.full and all_live:
                state.last_logprobs[:, g.views] = lp_live[:, :, -1]
                state.fed[:, g.views] += L
                continue
            if feed.full:
                tail = lp_live[:, :, -1]
            else:  # last real position of each row -> next-token log-probs
                idx = (plan.live_len - 1).clamp(min=0).to(dev_out)
                tail = lp_live[torch.arange(lp_live.shape[0], device=dev_out), :, idx]  # [B_live, n, V]
            upd = (lengths > 0) & state.live
            rows = torch.nonzero(upd).flatten().to(dev_out)
            live_upd = (plan.live_len > 0).to(dev_out)
            cur = state.last_logprobs[:, g.views]
            cur[rows] = tail[live_upd]
            state.last_logprobs[:, g.views] = cur
            state.fed[:, g.views] += (lengths * state.live)[:, None]
        if len(per_group) == 1 and per_group[0][0] == plan.selected:
            return per_group[0][1]
        out = torch.empty(B, state.num_views, L, self.vocab_size, device=state.last_logprobs.device)
        for views_g, lp in per_group:
            out[:, views_g] = lp
        return out[:, plan.selected]

    # ------------------------------------------------------------------ rows leave, rows roll back
    def release(self, state: HFViewState, rows: Sequence[int]) -> None:
        """Drop requests ``rows`` from every cache of ``state`` (``views.hf_state.release_rows``)."""
        release_rows(state, rows)

    def truncate(self, state: HFViewState, keep: torch.Tensor, views: Sequence[int] | None = None) -> None:
        """Roll back: request ``b`` keeps its first ``keep[b]`` fed tokens in the selected views
        (``views.hf_state.truncate_rows``)."""
        truncate_rows(state, keep, views)

    # ------------------------------------------------------------------ teacher forcing
    @torch.inference_mode()
    def sequence_logprobs(
        self,
        prompts: Sequence[Sequence[int]],
        continuations: Sequence[Sequence[int]],
        model: str = "main",
        batch_size: int = 16,
    ) -> list[torch.Tensor]:
        """Per-token log-probs (float32 [len(continuation)]) of each continuation after its prompt.

        Batches of ``batch_size`` rows, one uncached forward each (``views.teacher``).
        """
        if len(prompts) != len(continuations):
            raise ValueError("`prompts` and `continuations` must have the same length.")
        out: list[torch.Tensor] = []
        for s in range(0, len(prompts), batch_size):
            self.forward_count += 1
            out += teacher_forced_logprobs(self.models[model], prompts[s : s + batch_size],
                                           continuations[s : s + batch_size], pad_id=self._pad_id(model),
                                           vocab_size=self.vocab_size, layout=self._layout[model])
        return out


def _common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for i in range(n):
        t = first[i]
        if any(s[i] != t for s in seqs):
            return i
    return n
