"""One PEFT model seen as several views in one batched forward: a LoRA adapter on some rows only.

``RowAdapterModel(peft_model, pattern)`` is a causal LM the ``HFBackend`` can hold under a model
key. The backend flattens the views of a group b-major (row ``r`` is view ``r % n`` of request
``r // n``), so a pattern of ``n`` adapter names, one per view slot of the group, assigns every row
its weights: ``"__base__"`` = the frozen backbone (PEFT's name for "no adapter"), any other name =
that LoRA adapter. All rows run in ONE forward over ONE copy of the base weights: e.g. the base
view, π_ref and π_θ of PAD.

How: with a single LoRA adapter (PAD's case) every LoRA layer's ``scaling`` becomes, for the
duration of the forward, a per-row tensor ``[R, 1, 1]`` = α/r on the adapter's rows and 0 on the
``__base__`` rows, so ``result + B(A(x)) · scaling`` adds the low-rank delta to the adapter rows
only (exactly: ``y + δ·0 = y``). That costs a rank-r matmul on every row but no per-forward hook
registration or sub-batch indexing, which made PEFT's own mixed batch (``adapter_names=``) ~40%
slower per step on CPU; with several adapters we fall back to PEFT's mixed batch.

For plain LoRA linears (``nn.Linear`` base, no dropout, no variant, not merged) the per-row-scaled
delta runs as a lean forward installed for the duration of the call: PEFT's own tensor ops in
PEFT's order, so bit-identical, without PEFT's ~50 µs of per-call Python per layer (≈ 8 ms per
forward over SmolLM2's 210 LoRA layers). ``lean_lora = False`` keeps PEFT's forward.

It also keeps the input of the output head of its last forward (``last_hidden``, float
``[R, keep, D]``), which PAD's token features need (``training.persrm.model.token_features``).
Rows run different weights, so the backend must not share a prompt prefix across them
(``mixed_rows = True`` turns it off).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["RowAdapterModel", "BASE_ADAPTER"]

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


class RowAdapterModel(torch.nn.Module):
    """A view of ``peft_model`` whose rows use the adapters of ``pattern`` (cycled b-major).

    Args:
        peft_model: a ``peft.PeftModel`` over a causal LM (in eval mode while decoding).
        pattern: adapter name per view slot of the group, e.g. ``("__base__", "default")``.
    """

    mixed_rows = True
    lean_lora = True  # False: PEFT's own LoRA forward with a per-row scaling (same values, slower)

    def __init__(self, peft_model: Any, pattern: Sequence[str]) -> None:
        super().__init__()
        if not pattern:
            raise ValueError("`pattern` must name at least one adapter (or '__base__').")
        known = set(getattr(peft_model, "peft_config", {}))
        bad = [a for a in pattern if a != BASE_ADAPTER and a not in known]
        if bad:
            raise ValueError(f"`pattern` names unknown adapter(s) {bad}; the model has {sorted(known)}.")
        self.peft_model = peft_model
        self.pattern = tuple(pattern)
        self.mixed_rows = any(a != BASE_ADAPTER for a in self.pattern)
        self.last_hidden: torch.Tensor | None = None
        self._lm = peft_model.get_base_model()
        from peft.tuners.lora import LoraLayer

        self._lora_layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
        self._lean_plans: dict[tuple, Any] = {}  # row pattern -> its plan (lean forwards and state)
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

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: Any = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int = 0, **kwargs: Any) -> Any:
        x = input_ids if input_ids is not None else inputs_embeds
        cache = kwargs.pop("past_key_values", cache)
        names = self.row_adapters(int(x.shape[0]))
        captured: list[torch.Tensor] = []
        hook = self.get_output_embeddings().register_forward_hook(lambda m, i, o: captured.append(i[0]))
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

        Plain LoRA linears (the PersRM's case) run a lean forward for the duration of the call: the
        same tensor ops as PEFT's ``Linear.forward`` in the same order (``W x + b``, then
        ``+ B(A(x)) · scaling``), so the result is bit-identical, without PEFT's per-call Python
        (argument checks, adapter loops, three nested module calls per layer), which on CPU cost
        about as much as the matmuls of a one-token step. The lean forwards are built once per row
        pattern and reused while every layer's state (merged, disabled, scaling) is unchanged; they
        read the weights at every call. Other layers keep PEFT's forward with a per-row ``scaling``.
        """
        active = adapter or next(iter(self.peft_model.peft_config))
        if self.peft_model.active_adapter != active:
            self.peft_model.set_adapter(active)
        dtype = self.get_input_embeddings().weight.dtype  # the hidden states' dtype
        key = (tuple(names), active, dtype, x.device, self.lean_lora)
        plan = self._lean_plans.get(key)
        if plan is None or _lora_states(plan.layers, active) != plan.states:
            plan = self._build_plan(names, active, dtype, x.device)
            self._lean_plans = {key: plan}  # one pattern at a time: decoding reuses it at every step
        saved = []
        try:
            for d, lean in plan.swaps:
                d["forward"] = lean  # instance attribute: shadows the class method
            for layer in plan.scaled:
                saved.append((layer, layer.scaling[active]))
                layer.scaling[active] = plan.on * layer.scaling[active]
            # the LoRA layers live inside the base model and PEFT's wrapper only dispatches to it,
            # except for prompt-learning adapters, which add virtual tokens there
            return self._lm(**kw) if self._direct else self.peft_model(**kw)
        finally:
            for d, _ in plan.swaps:
                d.pop("forward", None)
            for layer, value in saved:
                layer.scaling[active] = value

    def _build_plan(self, names: list[str], active: str, dtype: torch.dtype, device: torch.device) -> _Plan:
        on = torch.tensor([a != BASE_ADAPTER for a in names], dtype=torch.float32, device=device)[:, None, None]
        layers = [layer for layer in self._lora_layers if active in layer.scaling]
        swaps, scaled = [], []
        for layer in layers:
            lean = _lean_lora_forward(layer, active, on, dtype) if self.lean_lora else None
            if lean is not None:
                swaps.append((layer.__dict__, lean))
            else:
                scaled.append(layer)
        return _Plan(layers=layers, states=_lora_states(layers, active), swaps=swaps, scaled=scaled, on=on)


@dataclass
class _Plan:
    """The lean forwards of one row pattern, valid while every layer's state is ``states``."""

    layers: list
    states: list
    swaps: list  # (layer.__dict__, lean forward)
    scaled: list  # layers run by PEFT's forward with a per-row scaling
    on: torch.Tensor  # float [rows, 1, 1]: 1 on adapter rows


def _lora_states(layers: list, adapter: str) -> list:
    """What the lean forwards depend on besides the weights, per layer (one comprehension: this runs every step)."""
    return [(bool(layer.merged_adapters), layer._disable_adapters, layer.scaling.get(adapter)) for layer in layers]


def _lean_lora_forward(layer: Any, adapter: str, on: torch.Tensor, dtype: torch.dtype) -> Any:
    """A forward for a plain PEFT LoRA ``Linear`` with per-row scaling, or None when ``layer`` is not one.

    Plain: an ``nn.Linear`` base layer, not merged, adapters enabled, no LoRA variant (DoRA, ...),
    no dropout (``Identity`` or p = 0, whatever the train/eval mode), and weights of the hidden
    states' dtype (PEFT would cast).
    """
    from peft.tuners.lora.layer import Linear as LoraLinear

    if type(layer) is not LoraLinear or layer.merged or layer.disable_adapters or adapter in layer.lora_variant:
        return None
    base = layer.base_layer
    if type(base) is not torch.nn.Linear:
        return None
    mods = layer.lora_dropout._modules
    drop = mods.get(adapter)
    if not (isinstance(drop, torch.nn.Identity) or (isinstance(drop, torch.nn.Dropout) and drop.p == 0)):
        return None
    a_mod, b_mod = layer.lora_A._modules[adapter], layer.lora_B._modules[adapter]
    if (type(a_mod) is not torch.nn.Linear or type(b_mod) is not torch.nn.Linear or a_mod.bias is not None
            or b_mod.bias is not None):
        return None
    if a_mod.weight.dtype != dtype or base.weight.dtype != dtype:
        return None
    scaling = on * layer.scaling[adapter]
    linear = torch.nn.functional.linear
    base_p, a_p, b_p = base._parameters, a_mod._parameters, b_mod._parameters

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs:  # not a plain call: PEFT's own forward (per-row scaling does not apply there)
            raise TypeError("lean LoRA forward takes only the input tensor")
        return linear(x, base_p["weight"], base_p["bias"]) + linear(linear(x, a_p["weight"]), b_p["weight"]) * scaling

    return forward
