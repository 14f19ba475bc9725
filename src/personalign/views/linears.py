"""Decode-step linears: per shape, the fastest exact formulation of ``y = x Wᵀ + b``, chosen by timing.

A decode step multiplies a few rows (one per view and request) by every weight matrix of the model.
Reading the weights costs the same for 1, 2 or 9 rows; what the CPU library does with a few rows
does not: measured on one 2-core machine, ``F.linear`` of 9 rows by SmolLM2's output head costs
3.2× one row, and padding the 9 rows to 16 costs 2.6×. So while the engine runs a one-token or
few-token step (``DecodeLinears.active``), every ``nn.Linear`` of its models, and the lean LoRA
rows of ``views.adapters``, run through ``linear``, which looks up the formulation chosen for the
shape ``(rows, in, out, dtype, device, bias)`` and times the candidates the first time it meets one:

- ``stock``: ``F.linear(x, W, b)``, what the model runs anyway;
- ``w_xt``: ``(W xᵀ)ᵀ``, the weights as the left operand (``addmm`` with the bias);
- ``pad<m>``: the rows padded with zeros to ``m`` (each row's result does not depend on the others);
- ``w_xt_pad<m>``: the rows padded to ``m``, then ``(W xᵀ)ᵀ``: a matrix-matrix product where the
  library sends one row (or another slow count) to a matrix-vector kernel — on some CPUs (measured:
  an AMD EPYC, MKL) SmolLM2's output head costs 2.1× as much for one row as for two rows this way;
- ``x_wt``: ``x (Wᵀ)`` from a contiguous transposed copy of ``W`` (extra memory);
- ``onednn``: oneDNN's linear over a copy of ``W`` in its blocked layout (extra memory; CPU, float32
  and bfloat16, where PyTorch is built with oneDNN).

Every candidate computes the same products and sums in float32 (or the weights' dtype) in another
order, so results agree with ``stock`` to rounding. A candidate replaces ``stock`` only when it is
faster by ``margin`` in the same timing rounds, so tuning never makes a shape slower than the stock
path it measured. Timing is realistic and bounded: each candidate runs over up to ``tune_bytes`` of
the model's own weights of that shape (so the weights come from memory, as in a real step, not from
a cache that one small matrix fits in), candidates interleaved over ``rounds`` rounds, median per
call; the whole process spends at most ``tune_seconds`` tuning (shapes met after that run ``stock``).
Per-shape timings cannot see everything a real step does, so each row count's first steps then
alternate between the tuned formulations and the stock path, timed, and keep the faster
(``DecodeLinears.active``).
Copies for ``x_wt``/``onednn`` stay within ``extra_bytes`` (by default a quarter of the linear
weights). Choices are kept for the process and, given ``cache_path`` (or
``PERSONALIGN_DECODE_LINEARS_CACHE``), on disk per machine (CPU model, threads, torch version). Prefill, scoring and
anything outside ``active`` run the stock ``nn.Linear`` untouched, as does ``model.generate``; so do
weights off the CPU (an accelerator's kernels are neither timed on the host clock nor quirky this way).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import statistics
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from personalign.environment import cpu_name

__all__ = ["DecodeLinears", "linear", "machine_fingerprint", "FORMULATIONS", "from_env", "pick"]

logger = logging.getLogger(__name__)

FORMULATIONS = ("stock", "w_xt", "pad", "w_xt_pad", "x_wt", "onednn")
_EXTRA_MEMORY = ("x_wt", "onednn")

_state = threading.local()  # .tuner: the DecodeLinears of the step running in this thread, else unset


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, in the tuned formulation of its shape while a decode step runs
    (``DecodeLinears.active``) in this thread."""
    tuner = getattr(_state, "tuner", None)
    if tuner is None:
        return F.linear(x, weight, bias)
    return tuner.run(x, weight, bias)


def machine_fingerprint() -> str:
    """What the choices depend on: CPU model, threads, torch version and its BLAS / oneDNN build."""
    return (f"{cpu_name()} | threads={torch.get_num_threads()} | torch={torch.__version__} | "
            f"mkl={torch.backends.mkl.is_available()} | onednn={torch.backends.mkldnn.is_available()}")


@dataclass(frozen=True)
class _Shape:
    rows: int
    n_in: int
    n_out: int
    dtype: torch.dtype
    device: str
    bias: bool

    def key(self) -> str:
        return (f"{self.rows}x{self.n_in}->{self.n_out}:{str(self.dtype).removeprefix('torch.')}:{self.device}"
                f"{':bias' if self.bias else ''}")


@dataclass
class Choice:
    """The formulation chosen for a shape and the median milliseconds per call each candidate took."""

    name: str
    ms: dict[str, float] = field(default_factory=dict)
    source: str = "timed"  # or "disk", or "budget" (tuning time spent: stock untimed)


def _onednn_ok(w: torch.Tensor) -> bool:
    return (w.device.type == "cpu" and w.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class DecodeLinears:
    """The tuned linear path of one engine: which ``nn.Linear``s it drives and what it chose per shape.

    Args:
        margin: a candidate must beat ``stock`` by this fraction of its time to be chosen.
        max_rows: shapes with more rows (rows × tokens of a step) run ``stock``.
        rounds: timing rounds per shape (candidates interleaved in each; the median is kept).
        tune_bytes: weights of a shape a candidate runs over per round (cycled, so they come from memory).
        tune_seconds: the most the process spends tuning; shapes met later run ``stock``.
        extra_bytes: the most the weight copies of ``x_wt``/``onednn`` may take (0: none of them);
            None: a quarter of the attached models' linear weights (room for SmolLM2's output head).
        cache_path: a JSON file keeping the choices per machine across processes (read and written);
            None: ``PERSONALIGN_DECODE_LINEARS_CACHE`` when set, else the process only.
        candidates: formulations to consider (default: all of ``FORMULATIONS``).
        force: run every shape in this formulation, untimed (checks of each one's results; ``pad``
            pads to the smallest size it would try); None tunes.
        trial_steps: timed steps of each path per row count before its verdict (``active``); 0 keeps
            the tuned path without the check.
        step_margin: how much faster (a fraction of the stock step) the tuned steps must be.
    """

    def __init__(self, *, margin: float = 0.1, max_rows: int = 64, rounds: int = 5, tune_bytes: int = 64 << 20,
                 tune_seconds: float = 60.0, extra_bytes: int | None = None, cache_path: str | Path | None = None,
                 candidates: tuple[str, ...] = FORMULATIONS, force: str | None = None, trial_steps: int = 4,
                 step_margin: float = 0.01) -> None:
        unknown = [c for c in candidates if c not in FORMULATIONS]
        if unknown or "stock" not in candidates:
            raise ValueError(f"`candidates` must include 'stock' and name only {FORMULATIONS}, got {candidates}.")
        if force is not None and force not in FORMULATIONS:
            raise ValueError(f"`force` must be one of {FORMULATIONS}, got {force!r}.")
        if not 0 <= margin < 1 or max_rows < 1 or rounds < 1:
            raise ValueError(f"need 0 <= margin < 1, max_rows >= 1 and rounds >= 1; got {margin}, {max_rows}, {rounds}.")
        self.force = force
        self.trial_steps, self.step_margin = trial_steps, step_margin
        self.verdicts: dict[tuple[int, int], str] = {}  # (id(model), rows) -> "tuned" | "stock"
        self.step_ms: dict[tuple[int, int], dict[str, float]] = {}  # the median steps behind each verdict
        self._trials: dict[tuple[int, int], dict[str, Any]] = {}
        self._clock = time.perf_counter
        self.margin, self.max_rows, self.rounds, self.tune_bytes = margin, max_rows, rounds, tune_bytes
        self.tune_seconds, self.candidates = tune_seconds, tuple(candidates)
        self.extra_bytes = extra_bytes
        cache_path = cache_path or os.environ.get("PERSONALIGN_DECODE_LINEARS_CACHE") or None
        self.cache_path = Path(cache_path) if cache_path else None
        self.fingerprint = machine_fingerprint()
        self.choices: dict[_Shape, Choice] = {}
        self.tuned_seconds = 0.0
        self.extra_used = 0
        # model -> its plain nn.Linear modules; (in, out, dtype, device) -> the weights of that shape
        self._modules: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._fast: dict[tuple, Callable[..., torch.Tensor]] = {}  # run()'s key -> the function it calls
        self._weights: dict[tuple, list[weakref.ref]] = {}
        self._linear_bytes = 0
        self._aux: dict[tuple[str, int], tuple[weakref.ref, Any]] = {}  # (kind, id(W)) -> (W, (stamp, copy))
        self._disk = self._read_disk()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ models
    def attach(self, model: torch.nn.Module) -> None:
        """Drive ``model``'s plain ``nn.Linear``s (exact type: quantized subclasses keep their own
        forward) during decode steps; again after adapters were added to it, to pick up theirs."""
        known = {id(d) for d, _ in self._modules.get(model, [])}
        mods = []
        for m in model.modules():
            if type(m) is not torch.nn.Linear:
                continue
            mods.append((m.__dict__, _LinearForward(m, self)))
            if id(m.__dict__) in known:
                continue
            w = m.weight
            self._weights.setdefault((w.shape[1], w.shape[0], w.dtype, w.device.type), []).append(weakref.ref(w))
            self._linear_bytes += w.numel() * w.element_size()
        self._modules[model] = mods

    @contextlib.contextmanager
    def active(self, model: torch.nn.Module, rows: int | None = None) -> Iterator[None]:
        """Run ``model``'s linears (and ``linear``) tuned in this thread for the duration of an
        inference-mode decode step of ``rows`` rows × tokens.

        With ``rows``, the whole step is checked too: per-shape timings cannot see everything a real
        step does (caches shared with the other ops, each call's own overhead), so the first steps of
        each row count alternate between the tuned formulations and the untouched stock path, timed,
        and the row count keeps the tuned path only if its median step is faster by ``step_margin``
        (``verdicts``); otherwise its steps run stock. Without ``rows``, always tuned.
        """
        use = self._use_tuned(model, rows)
        if not use:
            t0 = self._clock()
            yield
            self._record(model, rows, "stock", self._clock() - t0)
            return
        mods = self._modules.get(model)
        if mods is None:
            self.attach(model)
            mods = self._modules[model]
        prev = getattr(_state, "tuner", None)
        _state.tuner = self
        for d, fwd in mods:  # the instance attribute shadows nn.Linear.forward: a dict write, no Module.__setattr__
            d["forward"] = fwd
        t0, tuned0 = self._clock(), self.tuned_seconds
        try:
            yield
        finally:
            for d, _ in mods:
                d.pop("forward", None)
            _state.tuner = prev
        if self.tuned_seconds == tuned0:  # a step that tuned a shape is not a fair sample
            self._record(model, rows, "tuned", self._clock() - t0)

    def _use_tuned(self, model: torch.nn.Module, rows: int | None) -> bool:
        if rows is None or self.force is not None or self.trial_steps == 0:
            return True
        key = (id(model), rows)
        verdict = self.verdicts.get(key)
        if verdict is not None:
            return verdict == "tuned"
        trial = self._trials.setdefault(key, {"tuned": [], "stock": [], "n": 0})
        trial["n"] += 1
        return trial["n"] % 2 == 1  # tuned first (it tunes its shapes), then alternate

    def _record(self, model: torch.nn.Module, rows: int | None, path: str, seconds: float) -> None:
        key = (id(model), rows)
        trial = self._trials.get(key)
        if rows is None or trial is None or key in self.verdicts:
            return
        if trial["n"] <= 2:  # the first step of each path warms it
            return
        trial[path].append(seconds)
        if min(len(trial["tuned"]), len(trial["stock"])) >= self.trial_steps:
            ms = {"stock": 1000 * statistics.median(trial["stock"]), "tuned": 1000 * statistics.median(trial["tuned"])}
            self.verdicts[key] = pick(ms, self.step_margin)
            self.step_ms[key] = ms
            logger.debug("decode linears at %d rows: %s (median step stock %.2f ms, tuned %.2f ms)", rows,
                         self.verdicts[key], ms["stock"], ms["tuned"])

    # ------------------------------------------------------------------ the hot path
    def run(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """``F.linear(x, w, b)`` in the formulation chosen for its shape (one dict lookup once known)."""
        fn = self._fast.get((x.numel(), x.shape[-1], w.shape, w.dtype, w.is_cpu, b is None))
        if fn is None:
            fn = self._resolve(x, w, b)
        return fn(x, w, b)

    def _resolve(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> Callable[..., torch.Tensor]:
        """The function a shape runs (choosing it first if it is new); kept for ``run`` unless the
        call is one the tuned path leaves alone (autograd, a batched weight, too many rows)."""
        n_in = w.shape[-1]
        if w.dim() != 2 or x.shape[-1] != n_in or x.numel() == 0 or (
                torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)):
            return F.linear
        rows = x.numel() // n_in
        key = (x.numel(), x.shape[-1], w.shape, w.dtype, w.is_cpu, b is None)
        if rows > self.max_rows or not w.is_cpu:  # an accelerator's kernels are not timed on the host clock
            self._fast[key] = F.linear
            return F.linear
        shape = _Shape(rows, n_in, w.shape[0], w.dtype, w.device.type, b is not None)
        choice = self.choices.get(shape) or self._choose(shape, w)
        fn = F.linear if choice.name == "stock" else _any_rows(self._formulation(choice.name))
        self._fast[key] = fn
        return fn

    # ------------------------------------------------------------------ formulations
    def _formulation(self, name: str) -> Callable[..., torch.Tensor | None]:
        if name == "w_xt":
            return _w_xt
        if name.startswith("w_xt_pad"):
            m = int(name[len("w_xt_pad"):])
            return lambda x, w, b: _padded(x, w, b, m, _w_xt)
        if name.startswith("pad"):
            m = int(name[3:])
            return lambda x, w, b: _padded(x, w, b, m, F.linear)
        if name == "x_wt":
            return lambda x, w, b: self._with_copy("x_wt", x, w, b)
        if name == "onednn":
            return lambda x, w, b: self._with_copy("onednn", x, w, b)
        return F.linear

    def _copy_of(self, kind: str, w: torch.Tensor, *, budget: bool = True) -> Any:
        """``w``'s transposed (``x_wt``) or oneDNN-blocked (``onednn``) copy, made once and refreshed
        when ``w`` changes; None when making it would pass ``extra_bytes``."""
        key = (kind, id(w))
        got = self._aux.get(key)
        stamp = (w.data_ptr(), w._version if not w.is_inference() else 0)
        if got is not None and got[0]() is w and got[1][0] == stamp:
            return got[1][1]
        size = w.numel() * w.element_size()
        if got is None and budget and self.extra_used + size > self._budget():
            return None
        with torch.no_grad():
            if kind == "x_wt":
                copy = w.detach().t().contiguous()
            else:
                copy = torch.ops.mkldnn._reorder_linear_weight(w.detach(), 16)
        if got is None or got[0]() is not w:
            self.extra_used += size
        self._aux[key] = (weakref.ref(w), (stamp, copy))
        return copy

    def _budget(self) -> int:
        return self._linear_bytes // 4 if self.extra_bytes is None else self.extra_bytes

    def _with_copy(self, kind: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor | None:
        copy = self._copy_of(kind, w)
        if copy is None:
            return None
        if kind == "x_wt":
            return torch.mm(x, copy) if b is None else torch.addmm(b, x, copy)
        return torch.ops.mkldnn._linear_pointwise(x, copy, b, "none", [], "")

    def _free_copies(self, weights: list[torch.Tensor], kind: str) -> None:
        for w in weights:
            if self._aux.pop((kind, id(w)), None) is not None:
                self.extra_used -= w.numel() * w.element_size()

    # ------------------------------------------------------------------ tuning
    def _names(self, shape: _Shape, w: torch.Tensor) -> list[str]:
        names = []
        for c in self.candidates:
            if c in ("pad", "w_xt_pad"):
                names.extend(f"{c}{m}" for m in _pad_sizes(shape.rows, self.max_rows))
            elif c == "onednn" and not _onednn_ok(w):
                continue
            else:
                names.append(c)
        return names

    def _choose(self, shape: _Shape, w: torch.Tensor) -> Choice:
        with self._lock:
            if shape in self.choices:
                return self.choices[shape]
            stored = self._disk.get(shape.key())
            if self.force is not None:
                names = [n for n in self._names(shape, w) if n.startswith(self.force)]
                choice = Choice(names[0] if names else "stock", source="forced")
            elif stored is not None and stored in self._names(shape, w):
                choice = Choice(stored, source="disk")
            elif self.tuned_seconds >= self.tune_seconds:
                choice = Choice("stock", source="budget")
            else:
                t0 = time.perf_counter()
                choice = self._time(shape, w)
                self.tuned_seconds += time.perf_counter() - t0
                self._save_disk(shape, choice)
            self.choices[shape] = choice
            logger.debug("decode linear %s: %s (%s)%s", shape.key(), choice.name, choice.source,
                         "".join(f" {k}={v:.3f}ms" for k, v in choice.ms.items()))
            return choice

    def _time(self, shape: _Shape, w: torch.Tensor) -> Choice:
        group = self._weights.get((shape.n_in, shape.n_out, shape.dtype, shape.device), [])
        pool, size = [w], w.numel() * w.element_size()
        for ref in group:
            other = ref()
            if size >= self.tune_bytes:
                break
            if other is not None and other is not w:
                pool.append(other)
                size += other.numel() * other.element_size()
        # shaped as a decode step feeds it ([rows, 1 token, in]), through the same wrapper as a real call
        x = torch.randn(shape.rows, 1, shape.n_in, dtype=shape.dtype, device=w.device)
        b = torch.randn(shape.n_out, dtype=shape.dtype, device=w.device) if shape.bias else None
        names = self._names(shape, w)
        made: dict[str, list[torch.Tensor]] = {}
        limit, used = self._budget(), self.extra_used
        members = {id(m): m for m in [w, *(r() for r in group)] if m is not None}
        for kind in _EXTRA_MEMORY:  # timed only if the copies of the whole shape would fit when kept
            if kind not in names:
                continue
            missing = [m for m in members.values() if (kind, id(m)) not in self._aux]
            if used + sum(m.numel() * m.element_size() for m in missing) > limit:
                names.remove(kind)
                continue
            made[kind] = [p for p in pool if (kind, id(p)) not in self._aux]
            for p in made[kind]:
                self._copy_of(kind, p, budget=False)
        fns = {n: F.linear if n == "stock" else _any_rows(self._formulation(n)) for n in names}
        times: dict[str, list[float]] = {n: [] for n in names}
        with torch.inference_mode():
            for n in names:  # warm-up (and each formulation's one-time set-up)
                fns[n](x, pool[0], b)
            for _ in range(self.rounds):
                for n in names:
                    t = time.perf_counter()
                    for p in pool:
                        fns[n](x, p, b)
                    times[n].append((time.perf_counter() - t) / len(pool))
        ms = {n: 1000 * statistics.median(v) for n, v in times.items()}
        best = pick(ms, self.margin)
        for kind, fresh in made.items():  # keep the copies of the chosen formulation only
            if kind != best:
                self._free_copies(fresh, kind)
        return Choice(best, {n: round(v, 4) for n, v in ms.items()})

    # ------------------------------------------------------------------ reporting and disk
    def table(self) -> list[dict[str, Any]]:
        """One row per shape met: ``shape``, ``choice``, ``source`` and each candidate's ms per call."""
        return [{"shape": s.key(), "choice": c.name, "source": c.source, "ms": dict(c.ms)}
                for s, c in sorted(self.choices.items(), key=lambda kv: kv[0].key())]

    def summary(self) -> dict[str, Any]:
        """What bench output records: the machine, the choices, the tuning time and copies' memory."""
        return {"fingerprint": self.fingerprint, "tuned_seconds": round(self.tuned_seconds, 3),
                "extra_bytes": self.extra_used, "choices": {r["shape"]: r["choice"] for r in self.table()},
                "steps": {str(rows): {"path": v, **{f"{k}_ms": round(x, 3) for k, x in self.step_ms[(m, rows)].items()}}
                          for (m, rows), v in sorted(self.verdicts.items(), key=lambda kv: kv[0][1])}}

    def _read_disk(self) -> dict[str, str]:
        if self.cache_path is None or not self.cache_path.exists():
            return {}
        try:
            data = json.loads(self.cache_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            logger.warning("ignoring the decode-linear cache %s: %s", self.cache_path, e)
            return {}
        got = data.get(self.fingerprint, {}) if isinstance(data, dict) else {}
        return {k: v for k, v in got.items() if isinstance(v, str)}

    def _save_disk(self, shape: _Shape, choice: Choice) -> None:
        if self.cache_path is None:
            return
        try:
            data = json.loads(self.cache_path.read_text(encoding="utf-8")) if self.cache_path.exists() else {}
            if not isinstance(data, dict):
                data = {}
        except (OSError, json.JSONDecodeError):
            data = {}
        data.setdefault(self.fingerprint, {})[shape.key()] = choice.name
        try:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
            tmp.replace(self.cache_path)
        except OSError as e:
            logger.warning("could not write the decode-linear cache %s: %s", self.cache_path, e)


def pick(ms: dict[str, float], margin: float) -> str:
    """The fastest formulation when it beats ``stock`` by ``margin`` of stock's time, else ``stock``;
    one that needs a weight copy gives way to the fastest without one within ``margin`` of it."""
    best = min(ms, key=ms.__getitem__)
    if best in _EXTRA_MEMORY:
        free = min((n for n in ms if n not in _EXTRA_MEMORY), key=ms.__getitem__)
        if ms[free] <= (1 + margin) * ms[best]:
            best = free
    return best if ms[best] < (1 - margin) * ms["stock"] else "stock"


def from_env(value: str | None = None) -> DecodeLinears | bool | None:
    """``PERSONALIGN_DECODE_LINEARS``: ``off`` (stock linears everywhere), ``on`` (tuned), ``auto`` or
    unset (tuned for models on the CPU), ``force:<formulation>`` (every shape in one formulation)."""
    raw = (os.environ.get("PERSONALIGN_DECODE_LINEARS", "") if value is None else value).strip().lower()
    if raw in ("", "auto"):
        return None
    if raw in ("off", "0", "false", "stock"):
        return False
    if raw in ("on", "1", "true"):
        return True
    if raw.startswith("force:"):
        return DecodeLinears(force=raw.split(":", 1)[1])
    raise ValueError(f"PERSONALIGN_DECODE_LINEARS must be off, on, auto or force:<one of {FORMULATIONS}>, "
                     f"got {raw!r}.")


class _LinearForward:
    """An ``nn.Linear``'s forward during a decode step: the tuned ``F.linear`` of its own parameters."""

    __slots__ = ("params", "tuner")

    def __init__(self, module: torch.nn.Module, tuner: DecodeLinears) -> None:
        self.params, self.tuner = module._parameters, tuner

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        p = self.params
        return self.tuner.run(x, p["weight"], p["bias"])


def _any_rows(fn: Callable[..., torch.Tensor | None]) -> Callable[..., torch.Tensor]:
    """A 2-D formulation over inputs of any leading shape; ``F.linear`` where it declines (None)."""
    def run(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        y = fn(x.reshape(-1, x.shape[-1]), w, b)
        return F.linear(x, w, b) if y is None else y.view(*x.shape[:-1], w.shape[0])
    return run


def _w_xt(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    y = torch.mm(w, x.t()) if b is None else torch.addmm(b[:, None], w, x.t())
    return y.t().contiguous()


def _padded(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, m: int,
            product: Callable[..., torch.Tensor]) -> torch.Tensor:
    """``product`` (``F.linear`` or ``_w_xt``) of ``x``'s rows padded with zero rows to ``m``, cut back."""
    return product(torch.cat([x, x.new_zeros(m - x.shape[0], x.shape[1])]), w, b)[: x.shape[0]]


def _pad_sizes(rows: int, max_rows: int) -> list[int]:
    """Row counts worth padding to: the next multiples of 2, 4, 8 and 16 and the next power of two
    (one row: 2, 4, 8, 16; nine rows: 10, 12, 16)."""
    sizes = {-(-rows // q) * q for q in (2, 4, 8, 16)} | {1 << (rows - 1).bit_length()}
    return sorted(s for s in sizes if rows < s <= max(max_rows, 16))
