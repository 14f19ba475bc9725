"""One PEFT model seen as several views in one batched forward: a LoRA adapter on some rows only.

``RowAdapterModel(peft_model, pattern)`` is a causal LM the ``HFBackend`` can hold under a model
key. The backend flattens the views of a group b-major (row ``r`` is view ``r % n`` of request
``r // n``), so a pattern of ``n`` adapter names, one per view slot of the group, assigns every row
its weights: ``"__base__"`` = the frozen backbone (PEFT's name for "no adapter"), any other name =
that LoRA adapter. All rows run in ONE forward over ONE copy of the base weights: e.g. the base
view, π_ref and π_θ of PAD.

How: with a single LoRA adapter (PAD's case) every LoRA layer computes, for the duration of the
forward, ``result + B(A(x)) · scaling`` with a per-row scaling ``[R, 1, 1]`` = α/r on the adapter's
rows and 0 on the ``__base__`` rows, which adds the low-rank delta to the adapter rows only
(exactly: ``y + δ·0 = y``). That costs a rank-r matmul on every row but no per-forward hook
registration or sub-batch indexing, which made PEFT's own mixed batch (``adapter_names=``) ~40%
slower per step on CPU; with several adapters we fall back to PEFT's mixed batch.

Plain LoRA linears (``nn.Linear`` base, no dropout, no variant, not merged) become
``RowLoraLinear``s once per model: PEFT's class with a forward that, while a ``RowAdapterModel``
forward runs, computes the per-row-scaled delta with PEFT's own tensor ops in PEFT's order (so
bit-identical) without PEFT's ~50 µs of per-call Python per layer (≈ 8 ms per forward over SmolLM2's
210 LoRA layers), and skips the delta when no row uses the adapter; at any other time it is PEFT's
forward. A step selects its row pattern's plan with one assignment: no per-step loop over the
layers, which on CPU costs about a millisecond once the forward has flushed them from the caches.
``lean_lora = False`` keeps PEFT's forward (with the per-row scaling).

It also keeps the input of the output head of its last forward (``last_hidden``, float
``[R, keep, D]``), which PAD's token features need (``training.persrm.model.token_features``), and
runs the head only on the rows of view slots that need logits (``logits``): PAD's π_ref and π_θ
rows need only their hidden states when the head is linear (``output_head_is_linear``).
Rows run different weights, so the backend must not share a prompt prefix across them
(``mixed_rows = True`` turns it off).
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.layer import Linear as LoraLinear

from personalign.views.linears import linear

__all__ = ["RowAdapterModel", "BASE_ADAPTER", "output_head_is_linear"]

BASE_ADAPTER = "__base__"


_CACHE_NAMES: dict[Any, str] = {}


def _cache_name(fn: Any) -> str:
    """The KV-cache keyword of a forward: ``cache`` (newer transformers) or ``past_key_values``
    (read once per function: ``inspect.signature`` costs more than a decode step's bookkeeping)."""
    key = getattr(fn, "__func__", fn)
    name = _CACHE_NAMES.get(key)
    if name is None:
        name = _CACHE_NAMES[key] = "cache" if "cache" in inspect.signature(fn).parameters else "past_key_values"
    return name


_LINEAR_HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def output_head_is_linear(lm: Any) -> bool:
    """Whether ``lm``'s logits are its output head's affine map of the head's input, ``W h + b``
    (no soft-capping, scaling or other step after the head), checked once per model on a two-token
    forward. Then the logits of a row follow from its hidden state alone."""
    if lm in _LINEAR_HEADS:
        return _LINEAR_HEADS[lm]
    head = lm.get_output_embeddings()
    linear = False
    if isinstance(head, torch.nn.Linear):
        captured: list[torch.Tensor] = []
        hook = head.register_forward_hook(lambda m, i, o: captured.append(i[0]))
        try:
            with torch.inference_mode():
                logits = lm(input_ids=torch.tensor([[0, 1]], device=head.weight.device), use_cache=False).logits
                if captured:
                    mapped = torch.nn.functional.linear(captured[-1], head.weight, head.bias)
                    linear = mapped.shape == logits.shape and torch.allclose(mapped.float(), logits.float(),
                                                                              rtol=1e-4, atol=1e-4)
        finally:
            hook.remove()
    _LINEAR_HEADS[lm] = linear
    return linear


class RowAdapterModel(torch.nn.Module):
    """A view of ``peft_model`` whose rows use the adapters of ``pattern`` (cycled b-major).

    Args:
        peft_model: a ``peft.PeftModel`` over a causal LM (in eval mode while decoding).
        pattern: adapter name per view slot of the group, e.g. ``("__base__", "default")``.
        logits: per view slot, whether its rows need the output head (default: all). Rows that do
            not are views whose method reads only their hidden state (``last_hidden``): the head
            runs on the other rows only, and the forward's logits hold those rows alone, in order
            (``logit_rows``); ``HFBackend`` gives the others uniform log-probs.
    """

    mixed_rows = True
    lean_lora = True  # False: PEFT's own LoRA forward with a per-row scaling (same values, slower)

    def __init__(self, peft_model: Any, pattern: Sequence[str], logits: Sequence[bool] | None = None) -> None:
        super().__init__()
        if not pattern:
            raise ValueError("`pattern` must name at least one adapter (or '__base__').")
        if logits is not None and len(logits) != len(pattern):
            raise ValueError(f"`logits` must give one flag per view slot ({len(pattern)}), got {len(logits)}.")
        self.logits = tuple(bool(f) for f in logits) if logits is not None else (True,) * len(pattern)
        self._logit_rows: dict[tuple, torch.Tensor | None] = {}
        known = set(getattr(peft_model, "peft_config", {}))
        bad = [a for a in pattern if a != BASE_ADAPTER and a not in known]
        if bad:
            raise ValueError(f"`pattern` names unknown adapter(s) {bad}; the model has {sorted(known)}.")
        self.peft_model = peft_model
        self.pattern = tuple(pattern)
        self.mixed_rows = any(a != BASE_ADAPTER for a in self.pattern)
        self.last_hidden: torch.Tensor | None = None
        self._lm = peft_model.get_base_model()

        self._lora_layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
        self._ctx = _install_row_linears(self._lora_layers)
        self._lean_plans: dict[tuple, _Plan] = {}  # row pattern -> its plan
        # no prompt-learning adapter: the base model can be called directly (PEFT's wrapper only dispatches)
        self._direct = not any(getattr(c, "is_prompt_learning", False) for c in peft_model.peft_config.values())

    @property
    def config(self) -> Any:
        return self._lm.config

    @property
    def generation_config(self) -> Any:
        return getattr(self._lm, "generation_config", None)

    def get_output_embeddings(self) -> Any:
        return self._lm.get_output_embeddings()

    def get_input_embeddings(self) -> Any:
        return self._lm.get_input_embeddings()

    def row_adapters(self, rows: int) -> list[str]:
        n = len(self.pattern)
        if rows % n:
            raise ValueError(f"{rows} rows do not split into groups of {n} views {self.pattern}.")
        return [self.pattern[r % n] for r in range(rows)]

    def logit_rows(self, rows: int, device: Any = None) -> torch.Tensor | None:
        """long [R']: the rows of a ``rows``-row forward whose logits it returns; None when all are."""
        key = (rows, device)
        if key not in self._logit_rows:
            n = len(self.pattern)
            keep = [r for r in range(rows) if self.logits[r % n]]
            self._logit_rows[key] = None if len(keep) == rows else torch.tensor(keep, dtype=torch.long, device=device)
        return self._logit_rows[key]

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: Any = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int = 0, **kwargs: Any) -> Any:
        x = input_ids if input_ids is not None else inputs_embeds
        cache = kwargs.pop("past_key_values", cache)
        names = self.row_adapters(int(x.shape[0]))
        captured: list[torch.Tensor] = []
        rows = self.logit_rows(len(names), x.device)

        def head_input(module: Any, args: tuple) -> tuple | None:  # record it; the head runs on `rows` only
            captured.append(args[0])
            return None if rows is None else (args[0].index_select(0, rows), *args[1:])
        hook = self.get_output_embeddings().register_forward_pre_hook(head_input)
        try:
            kw = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      inputs_embeds=inputs_embeds, use_cache=use_cache, logits_to_keep=logits_to_keep,
                      **{_cache_name(self._lm.forward): cache}, **kwargs)
            adapters = {a for a in names if a != BASE_ADAPTER}
            if len(adapters) <= 1 and self._lora_layers:
                out = self._row_scaled_forward(names, adapters.pop() if adapters else None, x, kw)
            else:
                out = self.peft_model(**kw, adapter_names=names)
        finally:
            hook.remove()
        self.last_hidden = captured[-1].detach() if captured else None
        return out

    def _row_scaled_forward(self, names: list[str], adapter: str | None, x: torch.Tensor, kw: dict) -> Any:
        """One forward with the LoRA delta of ``adapter`` scaled per row (0 on ``__base__`` rows).

        Plain PEFT LoRA linears are ``RowLoraLinear``s (installed once, see ``_install_row_linears``):
        during this call they read their entry of the row pattern's plan from the model's shared
        ``_RowContext``, so a step costs one assignment here instead of a loop over every LoRA layer.
        Other LoRA layers (embeddings, quantized linears, ...) get PEFT's forward with a per-row
        ``scaling`` for the duration of the call.
        """
        active = adapter or next(iter(self.peft_model.peft_config))
        if self.peft_model.active_adapter != active:
            self.peft_model.set_adapter(active)
        dtype = self.get_input_embeddings().weight.dtype  # the hidden states' dtype
        grad = torch.is_grad_enabled()
        key = (tuple(names), active, dtype, x.device, self.lean_lora, grad)
        plan = self._lean_plans.get(key)
        if plan is None:
            plan = self._build_plan(names, active, dtype, x.device, grad)
            if len(self._lean_plans) >= 8:  # a few row patterns (batch sizes) at a time
                self._lean_plans.pop(next(iter(self._lean_plans)))
            self._lean_plans[key] = plan
        saved = []
        self._ctx.entries = plan.entries
        try:
            for layer in plan.scaled:
                saved.append((layer, layer.scaling[active]))
                layer.scaling[active] = plan.on * layer.scaling[active]
            # the LoRA layers live inside the base model and PEFT's wrapper only dispatches to it,
            # except for prompt-learning adapters, which add virtual tokens there
            return self._lm(**kw) if self._direct else self.peft_model(**kw)
        finally:
            self._ctx.entries = None
            for layer, value in saved:
                layer.scaling[active] = value

    def _build_plan(self, names: list[str], active: str, dtype: torch.dtype, device: torch.device,
                    grad: bool) -> _Plan:
        on = torch.tensor([a != BASE_ADAPTER for a in names], dtype=torch.float32, device=device)[:, None, None]
        slots = [k for k, a in enumerate(self.pattern) if a != BASE_ADAPTER]
        rows = slice(slots[0], None, len(self.pattern)) if len(slots) == 1 else None
        entries, scaled = {}, []
        for layer in self._lora_layers:
            if active not in layer.scaling:
                continue
            if isinstance(layer, _row_linear_class()):
                entries[layer] = _RowEntry(layer, active, on, rows, dtype, lean=self.lean_lora, grad=grad)
            else:
                scaled.append(layer)
        return _Plan(entries=entries, scaled=scaled, on=on)


@dataclass
class _Plan:
    """How one row pattern runs: an entry per ``RowLoraLinear``, the other LoRA layers, the row mask."""

    entries: dict  # RowLoraLinear -> _RowEntry
    scaled: list  # other LoRA layers: PEFT's forward with a per-row scaling
    on: torch.Tensor  # float [rows, 1, 1]: 1 on adapter rows


class _RowContext:
    """Shared by the ``RowLoraLinear``s of one PEFT model: the running plan's entries, or None
    outside a ``RowAdapterModel`` forward (then the layers run PEFT's own forward)."""

    __slots__ = ("entries",)

    def __init__(self) -> None:
        self.entries: dict | None = None


class _RowEntry:
    """One LoRA linear under one row pattern.

    ``lean``: the layer is plain (an ``nn.Linear`` base, no dropout, no LoRA variant, no LoRA bias,
    weights of the hidden states' dtype), so it runs PEFT's tensor ops in PEFT's order without
    PEFT's per-call Python: on every row with the per-row scaling, or, when the adapter rows are
    one view slot (``rows``, a strided slice) and each row feeds several tokens, on those rows only
    (``y + δ·0 = y`` on the others). ``skip``: no row uses the adapter (``W x + b`` is what PEFT
    computes with a zero scaling). Otherwise PEFT's forward with the per-row scaling ``on · scaling``.
    The layer's state is checked at every call: merged, disabled or rescaled since the plan was
    built, it takes PEFT's forward with the per-row scaling of its current state.
    """

    __slots__ = ("adapter", "scaling", "on", "rows", "scale", "lean", "skip", "base_p", "a_p", "b_p", "b_copy",
                 "b_t", "b_key")

    def __init__(self, layer: Any, adapter: str, on: torch.Tensor, rows: slice | None, dtype: torch.dtype, *,
                 lean: bool, grad: bool) -> None:
        self.adapter, self.scaling, self.on, self.rows = adapter, layer.scaling[adapter], on, rows
        self.scale = (on * self.scaling).to(dtype)
        self.lean = lean and _plain_lora(layer, adapter, dtype)
        self.skip = self.lean and not bool(on.any())
        self.base_p = layer.base_layer._parameters
        self.a_p = layer.lora_A._modules[adapter]._parameters if adapter in layer.lora_A else None
        self.b_p = layer.lora_B._modules[adapter]._parameters if adapter in layer.lora_B else None
        # B kept transposed as well (contiguous [r, out]): `h @ Bᵀ` is then a plain matrix product, about
        # 2 µs a call faster on CPU than `linear(h, B)` with K = r. Only without autograd (the copy
        # carries no gradient), and refreshed whenever B changes (its version counter or storage).
        self.b_copy = self.lean and not grad and not self.b_p["weight"].is_inference()
        self.b_t: torch.Tensor | None = None
        self.b_key: tuple = ()

    def lora_b(self, h: torch.Tensor) -> torch.Tensor:
        """``lora_B(h)`` (no bias), float [..., out]."""
        w = self.b_p["weight"]
        if not self.b_copy:
            return _linear(h, w)
        key = (w._version, w.data_ptr())
        if key != self.b_key:
            self.b_t, self.b_key = w.detach().t().contiguous(), key
        return torch.matmul(h, self.b_t)


def _plain_lora(layer: Any, adapter: str, dtype: torch.dtype) -> bool:
    """Whether ``layer`` (a PEFT LoRA ``Linear``) can run the lean ops for ``adapter``."""
    if layer.merged or layer.disable_adapters or adapter in layer.lora_variant or adapter not in layer.lora_A:
        return False
    base = layer.base_layer
    if type(base) is not torch.nn.Linear:
        return False
    drop = layer.lora_dropout._modules.get(adapter)
    if not (isinstance(drop, torch.nn.Identity) or (isinstance(drop, torch.nn.Dropout) and drop.p == 0)):
        return False
    a_mod, b_mod = layer.lora_A._modules[adapter], layer.lora_B._modules[adapter]
    if (type(a_mod) is not torch.nn.Linear or type(b_mod) is not torch.nn.Linear or a_mod.bias is not None
            or b_mod.bias is not None):
        return False
    return a_mod.weight.dtype == dtype and b_mod.weight.dtype == dtype and base.weight.dtype == dtype


def _per_row(scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-row factor ``[R, 1, 1]`` shaped for ``x``: as is for ``[R, T, D]`` inputs, repeated per token
    ``[R·T, 1]`` for models that flatten their rows before a projection (OPT's MLP)."""
    if x.dim() == 2:
        flat = scale.reshape(-1, 1)
        return flat if x.shape[0] == flat.shape[0] else flat.repeat_interleave(x.shape[0] // flat.shape[0], dim=0)
    return scale


def _row_lora_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """``RowLoraLinear.forward``: the running plan's rule for this layer, else PEFT's forward."""
    entries = self._row_ctx.entries
    entry = None if entries is None or args or kwargs else entries.get(self)
    if entry is None:
        return _PEFT_LINEAR_FORWARD(self, x, *args, **kwargs)
    if entry.lean and not self.merged_adapters and not self._disable_adapters and \
            self.scaling[entry.adapter] == entry.scaling:
        base = entry.base_p
        y = _linear(x, base["weight"], base["bias"])
        if entry.skip:
            return y
        rows = entry.rows
        if rows is not None and x.dim() == 3 and x.shape[1] > 1:
            # several tokens a row (a prefill): the delta of the adapter rows only, added in place
            y[rows].add_(entry.lora_b(_linear(x[rows], entry.a_p["weight"])), alpha=entry.scaling)
            return y
        # PEFT's `result + lora_B(lora_A(x)) * scaling` on every row (scaling 0 off the adapter rows),
        # the product and the sum in one kernel, into the fresh result
        return y.addcmul_(entry.lora_b(_linear(x, entry.a_p["weight"])), _per_row(entry.scale, x))
    saved = self.scaling[entry.adapter]
    self.scaling[entry.adapter] = _per_row(entry.on, x) * saved
    try:
        return _PEFT_LINEAR_FORWARD(self, x)
    finally:
        self.scaling[entry.adapter] = saved


_linear = linear  # F.linear, or the decode step's tuned formulation (views.linears)
_PEFT_LINEAR_FORWARD: Any = None
_ROW_LINEAR: Any = None


def _row_linear_class() -> type:
    """``RowLoraLinear``: PEFT's LoRA ``Linear`` whose forward follows a ``RowAdapterModel``'s plan
    while one runs (built on first use: PEFT is imported lazily)."""
    global _ROW_LINEAR, _PEFT_LINEAR_FORWARD
    if _ROW_LINEAR is None:
        _PEFT_LINEAR_FORWARD = LoraLinear.forward
        _ROW_LINEAR = type("RowLoraLinear", (LoraLinear,), {
            "forward": _row_lora_forward, "__module__": __name__, "__qualname__": "RowLoraLinear",
            "__doc__": "A PEFT LoRA ``Linear`` that a ``RowAdapterModel`` can run per row (``views.adapters``)."})
    return _ROW_LINEAR


def __getattr__(name: str) -> Any:  # `RowLoraLinear` by name, for pickle and copies of a module
    if name == "RowLoraLinear":
        return _row_linear_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _install_row_linears(layers: list) -> _RowContext:
    """Turn the plain PEFT LoRA ``Linear``s of one model into ``RowLoraLinear``s sharing one context
    (once per model; outside a ``RowAdapterModel`` forward they compute exactly PEFT's forward)."""
    cls = _row_linear_class()
    ctx = next((layer._row_ctx for layer in layers if isinstance(layer, cls)), None) or _RowContext()
    for layer in layers:
        if type(layer) is cls.__base__:
            layer.__class__ = cls
        if isinstance(layer, cls):
            layer._row_ctx = ctx
    return ctx
