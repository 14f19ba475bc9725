"""Reward scorers: one protocol, ``score(prompts, responses) -> list[float]`` (higher is better).

Implementations:

* ``FunctionScorer`` — a plain Python function ``f(prompt, response) -> float``, or
  ``f(prompt, response, preference) -> float`` to score with each request's preference.
* ``HFRewardScorer`` — a local Hugging Face sequence-classification model (one output = the
  reward; ``label`` picks a column of a multi-output head). The prompt and response are rendered
  as a user/assistant chat when the tokenizer has a chat template, else ``"{prompt}\\n\\n{response}"``.
  A directory path loads the model; ``template`` may also be ``hh`` (the Anthropic HH dialogue
  ``"\\n\\nHuman: {prompt}\\n\\nAssistant: {response}"``) or a format string with ``{prompt}`` and ``{response}``.
* ``PersRMScorer`` (``training.persrm.scorer``) — the PersRM's sequence-level reward for a preference.

Scorers work on text, so a reward model with a tokenizer different from the policy's is fine: the
text is re-tokenized by the scorer. Any other object with a ``score`` method plugs in as is.

Reward models also serve as *views* of the backend: ``RewardLMView`` runs a reward model's decoder
on the backend's KV cache (ARGS's cached candidates), ``BackboneRewardModel`` is a linear head on a
causal LM's decoder; ``load_reward_model`` reads both formats ``personalign train rm`` writes.
``import_object`` resolves a ``target`` (``package.module:name`` or ``path/to/file.py:name``).

A scorer with ``uses_preference = True`` takes ``preferences=`` (one text per row) in ``score``;
reward-guided methods pass each request's preference to it when it has no fixed one
(``uses_request_preference``).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from personalign.views.adapters import _cache_name
from personalign.views.loading import check_model_dir, pad_token_id

__all__ = ["RewardScorer", "FunctionScorer", "HFRewardScorer", "BackboneRewardModel", "RewardLMView",
           "load_reward_model", "load_reward_scorer", "prompt_text", "reward_from_logprobs", "as_scorer",
           "import_object", "score_texts", "uses_request_preference", "check_lengths", "REWARD_HEAD_FILE"]

_HH_TEMPLATE = "\n\nHuman: {prompt}\n\nAssistant: {response}"


@runtime_checkable
class RewardScorer(Protocol):
    """Scores responses to prompts; higher is better."""

    def score(self, prompts: list[str], responses: list[str]) -> list[float]: ...


def prompt_text(prompt: Any) -> str:
    """A request prompt as plain text (chat messages: their contents joined by blank lines)."""
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(m["content"] for m in prompt)


def check_lengths(prompts: Sequence[str], responses: Sequence[str]) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"`prompts` and `responses` must have the same length, got {len(prompts)} and {len(responses)}.")


class FunctionScorer:
    """A reward from a plain function ``fn(prompt, response) -> float``.

    A function with a third parameter named ``preference`` (``fn(prompt, response, preference)``)
    scores each row with its preference text: ``uses_preference`` is True and ``score`` takes
    ``preferences=``, one text per row; ``preference`` fixes one text for every row instead.
    """

    def __init__(self, fn: Callable[..., float], name: str = "", *, preference: str | None = None) -> None:
        if not callable(fn):
            raise ValueError(f"`fn` must be callable, got {type(fn).__name__}.")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "function")
        self.uses_preference = _takes_preference(fn)
        if preference is not None and not self.uses_preference:
            raise ValueError(f"reward function {self.name!r} takes no `preference` parameter; a preference cannot be fixed.")
        self.preference = preference

    def score(self, prompts: list[str], responses: list[str], preferences: Sequence[str] | None = None) -> list[float]:
        check_lengths(prompts, responses)
        if not self.uses_preference:
            return [float(self.fn(p, r)) for p, r in zip(prompts, responses)]
        prefs = list(preferences) if preferences is not None else [self.preference] * len(prompts)
        if len(prefs) != len(prompts):
            raise ValueError(f"`preferences` ({len(prefs)}) and `prompts` ({len(prompts)}) must have the same length.")
        if any(not isinstance(q, str) or not q for q in prefs):
            raise ValueError(f"reward function {self.name!r} scores with a preference: every request needs a "
                             "non-empty `preference` text.")
        return [float(self.fn(p, r, preference=q)) for p, r, q in zip(prompts, responses, prefs)]


def _takes_preference(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` has a parameter named ``preference`` that can be passed by keyword."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: called with two arguments
        return False
    return any(p.name == "preference" and p.kind is not p.POSITIONAL_ONLY for p in params)


def uses_request_preference(scorer: Any) -> bool:
    """Whether ``scorer`` needs each request's preference passed to ``score`` (no fixed one)."""
    return bool(getattr(scorer, "uses_preference", False)) and getattr(scorer, "preference", None) is None


def score_texts(scorer: Any, prompts: list[str], responses: list[str],
                preferences: Sequence[str | None] | None = None, *, what: str = "response") -> list[float]:
    """``scorer.score`` of the texts; a scorer that reads each row's preference (and has none fixed)
    gets ``preferences``, which must then hold a non-empty text for every row (``what`` names a row
    in the error)."""
    if not uses_request_preference(scorer):
        return scorer.score(prompts, responses)
    if preferences is None or any(not q for q in preferences):
        raise ValueError(f"the reward scores under each {what}'s preference; every {what} needs one "
                         "(or fix one preference on the scorer).")
    return scorer.score(prompts, responses, preferences=list(preferences))


class BackboneRewardModel(torch.nn.Module):
    """A sequence-level reward head on a causal LM's decoder: ``head(h_last)``, logits [N, labels].

    Used to build a reward model with a fresh head that shares a backbone already in memory
    (timing runs); the forward mirrors ``AutoModelForSequenceClassification`` (last real token).
    """

    def __init__(self, decoder: Any, hidden_size: int, num_labels: int = 1) -> None:
        super().__init__()
        self.decoder = decoder
        self.score = torch.nn.Linear(hidden_size, num_labels, bias=False)
        torch.nn.init.normal_(self.score.weight, std=hidden_size ** -0.5, generator=torch.Generator().manual_seed(0))
        self.score.to(next(decoder.parameters()).device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        h = self.decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [N, T, D]
        last = attention_mask.long().cumsum(1).argmax(1)  # right padding: last real position
        pooled = h[torch.arange(h.shape[0], device=h.device), last]
        return type("Out", (), {"logits": self.score(pooled.to(self.score.weight.dtype))})()


class _Rows:
    """Stands in for an output embedding: the backend only reads ``weight.shape[0]``."""

    def __init__(self, n: int) -> None:
        self.weight = torch.empty(n, 0)


class RewardLMView(torch.nn.Module):
    """A sequence-reward model as a backend view: the reward of each prefix, KV-cached.

    The backend runs causal LMs and returns log-softmaxed logits; this module runs the reward
    model's decoder with the backend's cache and returns, at every kept position, logits whose
    column 0 is the reward r of the text up to that position and the other columns 0. After the
    backend's log-softmax, ``r = logprobs[..., 0] − logprobs[..., 1]`` (``reward_from_logprobs``).
    The reward of a prefix is the head on its last hidden state, as a sequence classifier pools it.

    Args:
        decoder: the reward model's transformer (e.g. ``AutoModelForSequenceClassification().model``).
        head: its reward head, hidden [.., D] -> [.., labels].
        vocab_size: the policy's vocabulary (the width the backend expects).
        label: the head output used as the reward.
    """

    mixed_rows = False

    def __init__(self, decoder: Any, head: Any, vocab_size: int, label: int = 0) -> None:
        super().__init__()
        self.decoder, self.head, self.label = decoder, head, label
        self._rows = _Rows(vocab_size)

    @classmethod
    def from_classifier(cls, model: Any, vocab_size: int, label: int = 0) -> RewardLMView:
        """The view of a reward model: a ``BackboneRewardModel`` or a transformers sequence classifier
        (its decoder is the model's ``base_model``, its head ``score`` or ``classifier``)."""
        if isinstance(model, BackboneRewardModel):
            return cls(model.decoder, model.score, vocab_size, label)
        head = getattr(model, "score", None) or getattr(model, "classifier", None)
        dec = getattr(model, "base_model", None)
        if head is None or dec is None or dec is model or not isinstance(head, torch.nn.Linear):
            raise ValueError(
                f"cannot build a cached reward view of {type(model).__name__}: it needs a decoder (`base_model`) and "
                "a linear head `score` or `classifier`, as transformers' *ForSequenceClassification models and "
                "`personalign train rm` reward models have.")
        return cls(dec, head, vocab_size, label)

    @property
    def config(self) -> Any:
        return self.decoder.config

    def get_output_embeddings(self) -> Any:
        return self._rows

    def get_input_embeddings(self) -> Any:
        return self.decoder.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: Any = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int = 0, **kwargs: Any) -> Any:

        cache = kwargs.pop("past_key_values", cache)
        h = self.decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         inputs_embeds=inputs_embeds, use_cache=use_cache,
                         **{_cache_name(self.decoder.forward): cache}).last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        r = self.head(h.to(next(self.head.parameters()).dtype))[..., self.label].float()  # [R, keep]
        logits = torch.zeros(*r.shape, self._rows.weight.shape[0], device=r.device)
        logits[..., 0] = r
        return type("Out", (), {"logits": logits})()


def reward_from_logprobs(logprobs: torch.Tensor) -> torch.Tensor:
    """The reward carried by a ``RewardLMView``'s log-probs [..., V] -> [...]."""
    return logprobs[..., 0] - logprobs[..., 1]


class HFRewardScorer:
    """A sequence-classification reward model.

    Args:
        model: ``AutoModelForSequenceClassification`` (or any module with ``forward(input_ids,
            attention_mask).logits`` of shape [N, labels]).
        tokenizer: its tokenizer.
        label: output column used as the reward.
        batch_size: texts per forward.
        max_length: token budget per text (the end of long texts is kept).
    """

    def __init__(self, model: str | Any, tokenizer: Any | None = None, *, label: int = 0, template: str = "auto",
                 batch_size: int = 16, max_length: int = 1024, device: str = "cpu") -> None:
        if isinstance(model, str):
            loaded = load_reward_scorer(model, device=device, label=label)
            model, tokenizer = loaded.model, tokenizer or loaded.tokenizer
        if tokenizer is None:
            raise ValueError("`tokenizer` is required with a loaded reward model.")
        if batch_size < 1 or max_length < 2:
            raise ValueError(f"`batch_size` must be >= 1 and `max_length` >= 2, got {batch_size}, {max_length}.")
        n_labels = getattr(getattr(model, "config", None), "num_labels", None)
        if n_labels is not None and not 0 <= label < int(n_labels):
            raise ValueError(f"`label` must be in [0, {n_labels}), got {label}.")
        if template not in ("auto", "chat", "hh") and ("{prompt}" not in template or "{response}" not in template):
            raise ValueError("`template` must be auto, chat, hh or a string with {prompt} and {response}.")
        if template == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("`template` 'chat' needs a tokenizer with a chat template.")
        self.model, self.tokenizer, self.label, self.template = model, tokenizer, label, template
        self.batch_size, self.max_length = batch_size, max_length

    def render(self, prompt: str, response: str) -> str:
        """The text the reward model reads for one (prompt, response) pair."""
        return self._text(prompt, response)[0]

    def _text(self, prompt: str, response: str) -> tuple[str, bool]:
        tok, t = self.tokenizer, self.template
        if t == "chat" or (t == "auto" and getattr(tok, "chat_template", None)):
            msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            return tok.apply_chat_template(msgs, tokenize=False), False
        if t == "auto":
            return f"{prompt}\n\n{response}", True
        return (_HH_TEMPLATE if t == "hh" else t).format(prompt=prompt, response=response), True

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        check_lengths(prompts, responses)
        dev = next(self.model.parameters()).device
        pad = pad_token_id(self.tokenizer)
        out: list[float] = []
        for s in range(0, len(prompts), self.batch_size):
            rows = []
            for p, r in zip(prompts[s: s + self.batch_size], responses[s: s + self.batch_size]):
                text, special = self._text(p, r)
                rows.append(self.tokenizer(text, add_special_tokens=special)["input_ids"][-self.max_length:])
            W = max(len(r) for r in rows)
            ids = torch.full((len(rows), W), pad, dtype=torch.long)
            mask = torch.zeros(len(rows), W, dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, : len(r)] = torch.tensor(r)
                mask[i, : len(r)] = 1
            if isinstance(self.model, BackboneRewardModel):
                logits = self.model(ids.to(dev), mask.to(dev)).logits
            else:  # HF pools the last token that is not `pad_token_id`
                if getattr(self.model.config, "pad_token_id", None) is None:
                    self.model.config.pad_token_id = pad
                logits = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits
            n = logits.shape[-1]
            if not 0 <= self.label < n:
                raise ValueError(f"`label` must lie in [0, {n - 1}] for this reward model, got {self.label}.")
            out.extend(logits[:, self.label].float().tolist())
        return out


REWARD_HEAD_FILE = "reward_head.safetensors"  # a linear reward head beside a causal LM (``train rm``)


def load_reward_model(path: str, *, device: str = "cpu") -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a local reward model directory: a transformers sequence classifier, or
    a causal LM with a linear reward head beside it (``reward_head.safetensors``, what ``train rm``
    writes for architectures without a sequence-classification class), as a ``BackboneRewardModel``.

    Raises:
        ValueError: naming what is wrong with the path: missing, not a model directory, or a model
            that is not a reward model.
    """



    d = check_model_dir(path, "reward_model", hint="a reward model directory (from `personalign train rm`)")
    try:
        cfg = AutoConfig.from_pretrained(str(d))
        tok = AutoTokenizer.from_pretrained(str(d))
    except (OSError, ValueError) as e:
        raise ValueError(f"could not load `reward_model` {path!r}: {e}") from e
    head_file = Path(d) / REWARD_HEAD_FILE
    archs = list(getattr(cfg, "architectures", None) or [])
    try:
        if head_file.is_file():

            lm = AutoModelForCausalLM.from_pretrained(str(d)).to(device).eval()
            weight = load_file(str(head_file))["weight"]
            model = BackboneRewardModel(lm.base_model, int(weight.shape[-1]), num_labels=int(weight.shape[0]))
            with torch.no_grad():
                model.score.weight.copy_(weight.to(model.score.weight))
            return model.eval(), tok
        if not any(a.endswith("ForSequenceClassification") for a in archs):
            raise ValueError(
                f"`reward_model` {path!r} is a {', '.join(archs) or cfg.model_type} checkpoint, not a reward model (no "
                f"sequence-classification head, no {REWARD_HEAD_FILE}); train one on it with `personalign train rm`.")
        return AutoModelForSequenceClassification.from_pretrained(str(d)).to(device).eval(), tok
    except OSError as e:
        raise ValueError(f"could not load `reward_model` {path!r}: {e}") from e


def load_reward_scorer(path: str, *, device: str = "cpu", label: int = 0) -> HFRewardScorer:
    """A local reward model directory (``load_reward_model``) as an ``HFRewardScorer``."""
    model, tok = load_reward_model(path, device=device)
    return HFRewardScorer(model, tok, label=label)  # model is loaded here: no recursion


def import_object(target: str) -> Any:
    """``"package.module:attr"`` or ``"path/to/file.py:attr"`` -> the object (``ValueError`` naming what is missing)."""
    if not isinstance(target, str) or ":" not in target:
        raise ValueError(f"`target` must look like 'package.module:name' or 'path/to/file.py:name', got {target!r}.")
    mod_name, attr = target.rsplit(":", 1)
    if mod_name.endswith(".py"):
        obj: Any = _module_from_file(mod_name, target)
    else:
        try:
            obj = importlib.import_module(mod_name)
        except ImportError as e:
            raise ValueError(f"`target` {target!r}: cannot import module {mod_name!r} ({e}).") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"`target` {target!r}: module {mod_name!r} has no attribute {attr!r}.")
        obj = getattr(obj, part)
    return obj


def _module_from_file(path: str, target: str) -> Any:
    """The module in the Python file ``path`` (loaded once per resolved path)."""

    where = Path(path).expanduser().resolve()
    if not where.is_file():
        raise ValueError(f"`target` {target!r}: no Python file {path!r}.")
    name = f"personalign_user_{abs(hash(str(where))):x}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, where)
    if spec is None or spec.loader is None:
        raise ValueError(f"`target` {target!r}: {path!r} cannot be loaded as a Python module.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise ValueError(f"`target` {target!r}: running {path!r} failed: {type(e).__name__}: {e}") from e
    return module


def as_scorer(obj: Any) -> RewardScorer:
    """An object with ``score`` as is; a callable as a ``FunctionScorer``; a path as ``HFRewardScorer``."""
    if hasattr(obj, "score") and callable(obj.score):
        return obj
    if isinstance(obj, str):
        return HFRewardScorer(obj)  # a local sequence-classification directory
    if callable(obj):
        return FunctionScorer(obj)
    raise ValueError(f"a reward scorer must have score(prompts, responses), be callable or a path; got {type(obj).__name__}.")


