"""Speed and memory of each decoding method vs plain ``model.generate``, measured side by side.

Every method decodes the same B prompts (each request with a different preference: the serving
case) for exactly N new tokens (EOS ignored), after one warm-up; timings are medians over
``repeats`` interleaved runs, so ratios come from one process on one machine. Peak memory is
``torch.cuda.max_memory_allocated`` above the idle baseline on CUDA, and the peak resident set size
above the pre-run baseline on CPU, after ``malloc_trim`` returns freed heap pages to the OS
(RSS-based figures are coarser than CUDA's). On Linux the kernel keeps that peak: it is reset
before each run (``/proc/self/clear_refs``) and read after it (``VmHWM``), so nothing runs beside
the timed call; elsewhere a thread samples the RSS every 2 ms, which slows every run alike (about
8 % on 2 CPU cores) and leaves the ratios unchanged.

Those runtime peaks are small next to the weights, so each row also reports the **footprint**: the
bytes of every distinct parameter and buffer the run uses (the models of the method's backend and
the modules the method holds, e.g. a PersRM's adapter and head; tensors shared between them count
once) plus the runtime peak. ``footprint / generate`` is the memory ratio the targets speak of
(PAD: ≤ 1.15×, the paper's 2.0× being total GPU memory).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import statistics
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from personalign.assembly import Resources, build_backend, build_method
from personalign.decoding.loop import generate
from personalign.decoding.method import Method
from personalign.methods import METHODS, get_method
from personalign.methods.pdpo import PDPOMethod
from personalign.personas.attributes import default_pool
from personalign.personas.drift import DriftProfile, steer_identity
from personalign.personas.prompts import build_prompt_ids, pad_token_id
from personalign.training.persrm.model import PersRM
from personalign.training.user_model import UserIndex, UserModel
from personalign.types import Request
from personalign.views.adapters import output_head_is_linear
from personalign.views.base import Backend
from personalign.views.hf import HFBackend
from personalign.views.loading import LoadedModel
from personalign.views.reward import BackboneRewardModel, HFRewardScorer, load_reward_scorer

__all__ = ["BenchRow", "run_bench", "bench_method", "BENCH_PROMPTS", "BENCH_PREFERENCES", "format_table",
           "format_scaling", "format_targets", "resolve_methods", "weights_mb", "FOOTPRINT_TARGETS"]

# memory targets on the footprint (weights + runtime peak) / generate's, at B = 1
FOOTPRINT_TARGETS = {"pad": 1.15}

BENCH_PROMPTS = [
    "Explain how a hash map works.",
    "What should I pack for a week of hiking in the mountains in autumn?",
    "Why is the sky blue?",
    "Give me three tips to sleep better.",
    "How does a bill become a law in a parliamentary system?",
    "Write a short note thanking a colleague for their help on a difficult project.",
    "What is the difference between weather and climate?",
    "How do I start learning to play the guitar?",
]
BENCH_PREFERENCES = [
    "Generate a response that can be easily understood by an elementary school student.",
    "Generate a response that only a PhD Student in that specific field could understand.",
    "Generate a response that is concise and to the point, without being verbose.",
    "Generate a response that is very informative, without missing any background information.",
    "Generate a response that is friendly, witty, funny, and humorous, like a close friend.",
    "Generate a response in an unfriendly manner.",
]


# ----------------------------------------------------------------------------- presets
def bench_method(name: str, main: LoadedModel, backend: HFBackend, options: Mapping[str, Any] | None = None
                 ) -> tuple[Method, HFBackend, str]:
    """``(method, backend, note)``: method ``name`` as the bench times it, on ``main``.

    Methods that need trained parts get untrained ones unless ``options`` names trained ones
    (``persrm``: a PersRM checkpoint; ``reward_model``: a reward model directory; ``steer``: a loaded
    steering model): timing does not depend on training. Every method is built by assembly, as the
    CLI and the server build it.
    """
    opts = dict(options or {})
    preset = _PRESETS.get(name)
    if preset is not None:
        return preset(name, main, backend, opts)
    return build_method(name, {}, backend), backend, _NOTES.get(name, "")


_NOTES = {
    "amulet": "T = 60, α = λ = 2, η = 10; two views (preference, plain) in one batched forward",
    "linear_alignment": "r = 1, top-p 0.9; two views (preference, plain) in one batched forward",
}


def _pad(name: str, main: LoadedModel, backend: HFBackend, opts: dict) -> tuple[Method, HFBackend, str]:
    backbone = copy.deepcopy(main.model)  # the other rows (and model.generate) stay free of the adapter
    if opts.get("persrm"):
        rm, what = PersRM.load(opts["persrm"], backbone, main.tokenizer), f"PersRM {opts['persrm']}"
    else:
        rm = PersRM.create(backbone, main.tokenizer, name=main.name).eval()
        what = "untrained PersRM (fresh LoRA r=8, zero head; timing does not depend on training)"
    res = Resources(model=LoadedModel(model=rm.base_lm, tokenizer=main.tokenizer, name=main.name), persrm=rm)
    be = build_backend(res, ["pad"])
    note = (f"{what} on the same backbone: base, π_ref, π_θ views in one batched forward"
            + ("; output head on the base rows only (linear head)" if output_head_is_linear(rm.base_lm) else ""))
    return build_method("pad", {}, be, res), be, note


def _reward_guided(name: str, main: LoadedModel, backend: HFBackend, opts: dict) -> tuple[Method, HFBackend, str]:
    if opts.get("reward_model"):
        scorer = load_reward_scorer(opts["reward_model"], device=str(next(main.model.parameters()).device))
        what = opts["reward_model"]
    else:
        scorer = HFRewardScorer(BackboneRewardModel(main.model.base_model, main.model.config.hidden_size),
                                main.tokenizer)
        what = "a fresh linear head on the same backbone (untrained; timing does not depend on training)"
    res = Resources(model=main, reward_model=scorer)
    be = build_backend(res, [name])
    method = build_method(name, {}, be, res)
    if name == "best_of_n":
        return method, be, f"N=4 samples in one batch; reward model: {what}"
    if getattr(method, "reward_key", None) is None:
        return method, be, f"k=10; reward model {what} (tokenizer differs: text re-tokenized, no reward cache)"
    return method, be, f"k=10; cached reward views (k per request, one batched forward per step); reward model: {what}"


def _drift(name: str, main: LoadedModel, backend: HFBackend, opts: dict) -> tuple[Method, HFBackend, str]:
    """Seven attributes of the built-in pool with fixed unit-norm weights; steered by the LLM itself, or
    by the bench's ``steer`` model."""
    pool = default_pool()
    names = pool.names[:7]
    w = 1 / len(names) ** 0.5
    steer = opts.get("steer")
    small = steer if steer is not None else main
    prof = DriftProfile.from_weights(pool, {n: w * (-1) ** i for i, n in enumerate(names)},
                                     steer_identity(small.model, small.tokenizer, small.name), top_m=7)
    params = {"profile": prof.to_dict(), "top_m": 7}  # the profile travels as its JSON dict
    if steer is None:
        be = backend
        params["steer_model"] = "main"
        note = "7 attributes, hand-set weights (no fitting), steering model = the LLM itself"
    else:
        res = Resources(model=main, steer_model=steer)
        be = build_backend(res, ["drift"])
        params["steer_model"] = "steer"
        note = f"7 attributes, hand-set weights (no fitting), steering model = {steer.name}"
    return build_method("drift", params, be), be, note


def _pdpo(name: str, main: LoadedModel, backend: HFBackend, opts: dict) -> tuple[Method, HFBackend, str]:
    users = UserModel.for_model(backend.models["main"], kind="individual", num_users=8, user_tokens=10)
    users.to(backend.device("main"))
    method = PDPOMethod(users=users, index=UserIndex([f"user{i}" for i in range(1, 9)]))
    return method, backend, "untrained individual user model, T_u = 10 (timing only)"


def _persona_judge(name: str, main: LoadedModel, backend: HFBackend, opts: dict) -> tuple[Method, HFBackend, str]:
    second = BENCH_PREFERENCES[4]
    method = build_method("persona_judge", {"second_preference": second}, backend)
    return method, backend, (f"λ=4, alternating roles, lockstep schedule; each request's preference vs "
                             f"second_preference={second!r}")


_PRESETS: dict[str, Callable[..., tuple[Method, HFBackend, str]]] = {
    "pad": _pad, "args": _reward_guided, "best_of_n": _reward_guided, "drift": _drift, "pdpo": _pdpo,
    "persona_judge": _persona_judge,
}


@dataclass
class BenchRow:
    method: str
    batch_size: int
    new_tokens: int
    ms_per_token: float
    tokens_per_s: float
    peak_mem_mb: float
    time_ratio: float = float("nan")
    mem_ratio: float = float("nan")
    note: str = ""
    weights_mb: float = float("nan")  # distinct parameters and buffers the run uses
    footprint_ratio: float = float("nan")  # (weights + peak) / generate's


def _modules_in(obj: Any, depth: int = 2) -> list[torch.nn.Module]:
    """``obj`` if it is a module, else the modules among its attributes, ``depth`` levels down."""
    if isinstance(obj, torch.nn.Module):
        return [obj]
    if depth == 0 or not hasattr(obj, "__dict__"):
        return []
    return [m for v in vars(obj).values() for m in _modules_in(v, depth - 1)]


def weights_mb(*objects: Any) -> float:
    """MB of the distinct tensors (parameters and buffers, each storage once) of the modules among
    ``objects`` and their attributes (a method's PersRM, its scorer's model, ...)."""
    seen: dict[tuple[str, int], int] = {}
    for m in (m for obj in objects for m in _modules_in(obj)):
        for t in list(m.parameters()) + list(m.buffers()):
            st = t.untyped_storage()
            seen[(t.device.type, st.data_ptr())] = st.nbytes()
    return sum(seen.values()) / 2**20


class _PeakRSS:
    """Peak resident set size (bytes) of this process while the block runs.

    Linux: the kernel's high-water mark, reset on entry (``clear_refs``) and read on exit; no thread
    runs beside the block. Elsewhere (or when the reset is refused): a thread sampling every 2 ms.
    """

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._t: threading.Thread | None = None

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    @staticmethod
    def high_water_mark() -> int | None:
        """VmHWM in bytes, or None where /proc/self/status has none."""
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    @staticmethod
    def reset_high_water_mark() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def __enter__(self) -> _PeakRSS:
        self.base = self.rss()
        self.peak = self.base
        if self.reset_high_water_mark() and self.high_water_mark() is not None:
            return self
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.002)

    def __exit__(self, *exc: Any) -> None:
        if self._t is not None:
            self._stop.set()
            self._t.join()
        else:
            self.peak = max(self.peak, self.high_water_mark() or 0)
        self.peak = max(self.peak, self.rss())


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS so a CPU run's RSS baseline is not inflated by the last run."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _measure(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """(seconds, peak extra memory in MB) of one call."""
    gc.collect()
    _release_freed_memory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        return dt, (torch.cuda.max_memory_allocated(device) - base) / 2**20
    with _PeakRSS() as m:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
    return dt, (m.peak - m.base) / 2**20


def _plain_generate_fn(main: Any, prompts: list[str], n: int) -> Callable[[], Any]:
    tok, model = main.tokenizer, main.model
    rows = [build_prompt_ids(tok, p) for p in prompts]
    W = max(len(r) for r in rows)
    pad = pad_token_id(tok)
    ids = torch.full((len(rows), W), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, W - len(r):] = torch.tensor(r)
        mask[i, W - len(r):] = 1
    dev = next(model.parameters()).device
    ids, mask = ids.to(dev), mask.to(dev)

    def fn() -> Any:
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, pad_token_id=pad)
    return fn


def run_bench(
    main: Any,
    backend: Backend,
    methods: Sequence[str],
    *,
    batch_size: int = 1,
    max_new_tokens: int = 64,
    repeats: int = 3,
    progress: Callable[[str], None] | None = None,
    options: Mapping[str, Any] | None = None,
    stock_backend: Backend | None = None,
) -> list[BenchRow]:
    """Time ``model.generate`` and each method on the same prompts; ratios are method / generate.

    ``options`` (``persrm``, ``reward_model``, ``steer``) give the presets trained helpers
    (``bench_method``). ``stock_backend``: a second backend over the same model with the stock
    decode linears (``views.linears``); each method also runs on it, in the same interleaved rounds,
    as a row ``"<method> (stock linears)"``."""
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
    if max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be >= 1, got {max_new_tokens}.")
    if repeats < 1:
        raise ValueError(f"`repeats` must be >= 1, got {repeats}.")
    classes = {m: get_method(m) for m in methods}  # validate names first
    prompts = [BENCH_PROMPTS[i % len(BENCH_PROMPTS)] for i in range(batch_size)]
    requests = [Request(prompt=p, preference=BENCH_PREFERENCES[i % len(BENCH_PREFERENCES)])
                for i, p in enumerate(prompts)]
    device = next(main.model.parameters()).device
    runners: dict[str, tuple[Callable[[], Any], str]] = {
        "generate": (_plain_generate_fn(main, prompts, max_new_tokens), "transformers model.generate (greedy)")
    }
    weights = {"generate": weights_mb(main.model)}
    skipped: list[BenchRow] = []
    ways = [("", backend)] + ([(" (stock linears)", stock_backend)] if stock_backend is not None else [])
    for name in classes:
        for suffix, way in ways:
            try:
                method, be, note = bench_method(name, main, way, options)
            except ValueError as e:  # a method that cannot be built here is reported, not fatal
                skipped.append(BenchRow(method=name + suffix, batch_size=batch_size, new_tokens=max_new_tokens,
                                        ms_per_token=float("nan"), tokens_per_s=float("nan"),
                                        peak_mem_mb=float("nan"), note=f"skipped: {e}"))
                continue
            weights[name + suffix] = weights_mb(*be.models.values(), method)

            def fn(method: Any = method, be: Any = be) -> Any:
                return generate(method, requests, be, max_new_tokens=max_new_tokens, ignore_eos=True)
            runners[name + suffix] = (fn, note)
    times: dict[str, list[float]] = {k: [] for k in runners}
    mems: dict[str, list[float]] = {k: [] for k in runners}
    for k, (fn, _) in runners.items():  # warm-up
        if progress:
            progress(f"warm-up {k}")
        fn()
    for r in range(repeats):
        for k, (fn, _) in runners.items():
            if progress:
                progress(f"run {r + 1}/{repeats} {k}")
            dt, mem = _measure(fn, device)
            times[k].append(dt)
            mems[k].append(mem)
    rows = []
    for k, (_, note) in runners.items():
        t = statistics.median(times[k])
        rows.append(BenchRow(method=k, batch_size=batch_size, new_tokens=max_new_tokens,
                             ms_per_token=1000 * t / max_new_tokens, tokens_per_s=batch_size * max_new_tokens / t,
                             peak_mem_mb=max(mems[k]), note=note, weights_mb=weights[k]))
    ref = rows[0]
    for row in rows:
        row.time_ratio = row.ms_per_token / ref.ms_per_token
        row.mem_ratio = row.peak_mem_mb / ref.peak_mem_mb if ref.peak_mem_mb > 0 else float("nan")
        row.footprint_ratio = (row.weights_mb + row.peak_mem_mb) / (ref.weights_mb + ref.peak_mem_mb)
    return rows + skipped


def resolve_methods(spec: str) -> list[str]:
    """``"all"`` -> every registered method; else the comma-separated names (validated)."""

    if spec.strip() == "all":
        return METHODS.names()
    names = [m.strip() for m in spec.split(",") if m.strip()]
    if not names:
        raise ValueError("`--methods` must name at least one method, or be 'all'.")
    for m in names:
        get_method(m)
    return names


def format_scaling(rows: Sequence[BenchRow]) -> str:
    """tokens/s of each method at each batch size, and the ratio to its smallest batch size."""
    sizes = sorted({r.batch_size for r in rows})
    if len(sizes) < 2:
        return ""
    by = {(r.method, r.batch_size): r for r in rows}
    methods = list(dict.fromkeys(r.method for r in rows))
    b0 = sizes[0]
    head = "| method | " + " | ".join(f"tokens/s B={b}" for b in sizes) + " | " + \
        " | ".join(f"B={b} / B={b0}" for b in sizes[1:]) + " |"
    lines = [head, "|---" * (1 + 2 * len(sizes) - 1) + "|"]
    for m in methods:
        tps = [by[(m, b)].tokens_per_s if (m, b) in by else float("nan") for b in sizes]
        ratios = [t / tps[0] if tps[0] == tps[0] and tps[0] > 0 else float("nan") for t in tps[1:]]
        lines.append(f"| {m} | " + " | ".join(f"{t:.1f}" for t in tps) + " | " +
                     " | ".join(f"{x:.2f}×" for x in ratios) + " |")
    return "\n".join(lines)


def format_targets(rows: Sequence[BenchRow], max_time_ratio: float = 1.3, min_batch_speedup: float = 8.0,
                   footprint: dict[str, float] | None = None) -> str:
    """The targets, checked on these rows: time ratio at B = 1, memory footprint ratio at B = 1
    (``footprint``: method -> bound, default ``FOOTPRINT_TARGETS``), batch tokens/s speedup."""
    footprint = FOOTPRINT_TARGETS if footprint is None else footprint
    out = []
    for r in rows:
        if r.batch_size == 1 and r.method != "generate" and r.time_ratio == r.time_ratio:
            ok = "yes" if r.time_ratio <= max_time_ratio else "no"
            out.append(f"- {r.method}: B=1 time / generate = {r.time_ratio:.2f} (target ≤ {max_time_ratio}): {ok}")
            if r.method in footprint and r.footprint_ratio == r.footprint_ratio:
                ok = "yes" if r.footprint_ratio <= footprint[r.method] else "no"
                out.append(f"- {r.method}: B=1 memory footprint / generate = {r.footprint_ratio:.3f} "
                           f"(target ≤ {footprint[r.method]}): {ok}")
    sizes = sorted({r.batch_size for r in rows})
    if 1 in sizes and len(sizes) > 1:
        big = sizes[-1]
        by = {(r.method, r.batch_size): r for r in rows}
        for m in dict.fromkeys(r.method for r in rows):
            if (m, 1) in by and (m, big) in by and by[(m, 1)].tokens_per_s == by[(m, 1)].tokens_per_s:
                sp = by[(m, big)].tokens_per_s / by[(m, 1)].tokens_per_s
                out.append(f"- {m}: tokens/s B={big} / B=1 = {sp:.2f} (GPU target ≥ {min_batch_speedup}): "
                           f"{'yes' if sp >= min_batch_speedup else 'no'}")
    return "\n".join(out)


def format_table(rows: Sequence[BenchRow]) -> str:
    head = ("| method | B | new tokens | ms/token | tokens/s | peak mem (MB) | weights (MB) | time / generate | "
            "mem / generate | footprint / generate |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        if r.ms_per_token != r.ms_per_token:
            lines.append(f"| {r.method} | {r.batch_size} | {r.new_tokens} |" + " – |" * 7)
            continue
        lines.append(f"| {r.method} | {r.batch_size} | {r.new_tokens} | {r.ms_per_token:.2f} | {r.tokens_per_s:.1f} | "
                     f"{r.peak_mem_mb:.1f} | {r.weights_mb:.1f} | {r.time_ratio:.3f} | {r.mem_ratio:.3f} | "
                     f"{r.footprint_ratio:.3f} |")
    notes = list(dict.fromkeys(f"- {r.method}: {r.note}" for r in rows if r.note))  # once per method
    return "\n".join(lines + ([""] + notes if notes else []))
