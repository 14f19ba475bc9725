"""Assembly: the one path from what a user names to a backend with everything attached, and methods.

    resources = Resources(model="smollm2", persrm="runs/persrm")    # what the user named (paths, options)
    backend = build_backend(resources, ["pad", "base"])              # loads and attaches it, once
    pad = build_method("pad", {"beta": 2.0}, backend, resources)     # a method over that backend

The CLI maps its flags to ``Resources``, an evaluation config maps its YAML to it, the server uses it
for every method it serves; nothing below this module sees argparse. Everything that changes a
backend happens here, before decoding:

* ``persrm`` (PAD; the reward of ARGS and best-of-N): a PersRM checkpoint is loaded onto the main
  model when that is its recorded backbone (its LoRA adapter injected into those weights), which then
  becomes an adapter-free view of the same weights (``RowAdapterModel``), so every other method still
  decodes the base model; PAD's adapter views are registered beside it (``attach_persrm``);
* ``reward_model`` / ``reward_function``: a reward scorer; a reward model that shares the policy's
  tokenizer is also registered as a cached reward view (``"reward"``, ARGS);
* ``pdpo_checkpoint``: the P-DPO adapter is loaded into the main model (one method) or into its own
  copy of the base model under ``"pdpo"`` (``shared``: a backend that serves several methods);
* ``steer_model``: Drift's small steering model under ``"steer"``.

A method declares what it ``requires`` (names of the resources above) and is made by its
``from_resources(config, loaded)``; its ``build_views`` only reads the backend. A requirement that
could not be met (a missing path, a checkpoint of another base model) is recorded with its reason:
``build_method`` raises it for the methods that need it, and the others are built as usual (a server
lists the unmet ones in ``/health``).
"""

from __future__ import annotations

import copy
import logging
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from personalign.config import config_from_mapping
from personalign.decoding.loaded import Loaded
from personalign.decoding.method import METHODS, Method
from personalign.methods.pad import pad_views
from personalign.training.pdpo.checkpoint import load_checkpoint, read_checkpoint_config
from personalign.training.persrm.model import PersRM, backbone_fingerprint
from personalign.training.persrm.scorer import PersRMScorer
from personalign.views.adapters import BASE_ADAPTER, RowAdapterModel
from personalign.views.base import Backend
from personalign.views.hf import HFBackend, check_same_tokenizer
from personalign.views.loading import LoadedModel, load_model
from personalign.views.reward import (
    FunctionScorer,
    HFRewardScorer,
    RewardLMView,
    RewardScorer,
    import_object,
    load_reward_scorer,
)

__all__ = ["Resources", "Loaded", "build_backend", "build_method", "build_methods", "attach_persrm",
           "attach_reward_view", "attached", "method_config", "method_resources", "REQUIREMENTS", "RESOURCE_FIELDS"]

logger = logging.getLogger(__name__)

# what each requirement name means, for messages
REQUIREMENTS = {
    "persrm": "a PersRM (`persrm`: a checkpoint of `personalign train pad`; CLI `--persrm DIR`)",
    "reward": "a reward (`reward_model` PATH, `reward_function` MODULE:NAME or `persrm` DIR; CLI `--reward-model`, "
              "`--reward-function` or `--persrm`)",
    "pdpo": "a P-DPO checkpoint (`pdpo_checkpoint`: from `personalign train pdpo`; CLI `--checkpoint DIR`)",
}

# the ``Resources`` fields each resource name is made of (a method's ``requires`` and ``uses``)
RESOURCE_FIELDS = {
    "persrm": ("persrm",),
    "reward": ("reward_model", "reward_label", "reward_function", "persrm"),
    "pdpo": ("pdpo_checkpoint",),
    "steer": ("steer_model", "steer_gguf_file"),
    "drift_profile": ("drift_profile",),
}


def method_resources(name: str) -> frozenset[str]:
    """The ``Resources`` fields (beyond the main model) that method ``name`` reads."""
    cls = METHODS.get(name)
    return frozenset(f for r in (*cls.requires, *cls.uses) for f in RESOURCE_FIELDS[r])


def method_config(name: str, params: Mapping[str, Any] | None) -> Any:
    """Method ``name``'s validated config: its defaults overridden by ``params`` (before anything
    is loaded, so a bad value fails at once). Raises ``ValueError`` naming the field."""
    return config_from_mapping(METHODS.get(name).Config, dict(params or {}))


@dataclass(frozen=True, kw_only=True)
class Resources:
    """What the methods of one backend may need, as the user names it (paths and options), or
    already loaded objects (the Python API, tests, benchmarks).

    Attributes:
        model: the main model: a local directory, ``.gguf`` file, hub id, ``smollm2``, ``gemma3-270m``,
            or a ``LoadedModel``; None takes the base model a ``pdpo_checkpoint`` records.
        gguf_file, dtype, device, random_weights, tokenizer: how ``model`` is loaded
            (``views.loading.load_model``; device None: CUDA when there is one).
        persrm: a PersRM checkpoint directory, or a ``PersRM``.
        steer_model: Drift's steering model (path or ``LoadedModel``); ``steer_gguf_file`` its GGUF file.
        reward_model: a reward model directory (``train rm``), or any ``RewardScorer``; ``reward_label``
            its output column.
        reward_function: a Python reward ``MODULE:NAME`` / ``FILE.py:NAME``, or the callable itself.
        pdpo_checkpoint: a P-DPO checkpoint directory.
        drift_profile: the Drift profile (path or dict) of requests that bring none.
        shared: the backend serves several methods at once (a server): P-DPO decodes its own copy of
            the base model, so the main model every other method decodes stays the base model.
        decode_linears: the backend's decode-step linears (``views.linears``): None tunes them where
            it pays (the default), True always, False runs the stock path.
    """

    model: str | LoadedModel | None = None
    gguf_file: str | None = None
    dtype: str = "auto"
    device: str | None = None
    random_weights: bool = False
    tokenizer: str | None = None
    persrm: str | PersRM | None = None
    steer_model: str | LoadedModel | None = None
    steer_gguf_file: str | None = None
    reward_model: str | RewardScorer | None = None
    reward_label: int = 0
    reward_function: str | Callable[..., float] | None = None
    pdpo_checkpoint: str | None = None
    drift_profile: str | dict | None = None
    shared: bool = False
    decode_linears: bool | None = None

    @property
    def device_name(self) -> str:
        return self.device or ("cuda" if torch.cuda.is_available() else "cpu")

    def load(self, model: str, gguf_file: str | None = None) -> LoadedModel:
        """Load another model the way ``model`` is loaded (same dtype, device)."""
        return load_model(model, gguf_file=gguf_file, dtype=self.dtype, device=self.device_name,
                          random_weights=self.random_weights, tokenizer=self.tokenizer)


_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def attached(backend: Backend) -> Loaded | None:
    """What assembly attached to ``backend`` (None for a backend built by hand)."""
    return _ATTACHED.get(backend)


def _requirements(methods: Sequence[str]) -> set[str]:
    return {r for name in methods for r in METHODS.get(name).requires}


def _main_model(resources: Resources) -> LoadedModel:
    if isinstance(resources.model, LoadedModel):
        return resources.model
    name, gguf = resources.model, resources.gguf_file
    if name is None:
        if not resources.pdpo_checkpoint:
            raise ValueError("`model` is required (a model directory, .gguf file, hub id or 'smollm2').")
        base = read_checkpoint_config(resources.pdpo_checkpoint)["base_model"]
        name, gguf = base.get("name"), gguf or base.get("gguf_file")
    return resources.load(name, gguf)


def build_backend(resources: Resources, methods: Sequence[str]) -> HFBackend:
    """The backend the named ``methods`` decode on, with every resource they require loaded and
    attached (see the module docstring). A requirement that cannot be met is recorded, not raised:
    ``build_method`` raises it for the methods that need it."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        METHODS.get(unknown[0])  # the registry's error lists the valid names
    needs = _requirements(methods)
    main = _main_model(resources)
    loaded = Loaded(main=main, drift_profile=resources.drift_profile)
    models: dict[str, Any] = {"main": main.model}
    tokenizers: dict[str, Any] = {"main": main.tokenizer}
    if resources.steer_model is not None:
        steer = resources.steer_model if isinstance(resources.steer_model, LoadedModel) else \
            resources.load(resources.steer_model, resources.steer_gguf_file)
        models["steer"], tokenizers["steer"] = steer.model, steer.tokenizer
        loaded.steer_key = "steer"
    if "pdpo" in needs:
        try:
            _load_pdpo(resources, loaded, models, tokenizers)
        except (ValueError, OSError) as e:
            loaded.unmet["pdpo"] = str(e)
    if resources.persrm is not None and needs & {"persrm", "reward"}:
        try:
            loaded.persrm, loaded.persrm_shared = _load_persrm(resources, main, models)
        except (ValueError, OSError) as e:
            loaded.unmet["persrm"] = str(e)
    elif "persrm" in needs:
        loaded.unmet["persrm"] = f"it needs {REQUIREMENTS['persrm']}"
    backend = HFBackend(models, tokenizers, decode_linears=resources.decode_linears)
    if loaded.persrm is not None:
        attach_persrm(backend, loaded.persrm, shared=loaded.persrm_shared, views="persrm" in needs)
    if "reward" in needs:
        try:
            loaded.scorer = _reward_scorer(resources, loaded, backend)
            loaded.reward_key = attach_reward_view(backend, loaded.scorer)
        except (ValueError, OSError) as e:
            loaded.unmet["reward"] = str(e)
    _ATTACHED[backend] = loaded
    return backend


def build_method(name: str, params: Mapping[str, Any] | None, backend: Backend, resources: Resources | None = None
                 ) -> Method:
    """The method ``name`` with config ``params`` (its defaults overridden) over ``backend``.

    Raises:
        ValueError: an unknown method or parameter, or a requirement ``build_backend`` could not meet.
    """
    cls = METHODS.get(name)
    loaded = attached(backend)
    if loaded is None:  # a backend built by hand: no resources beyond its main model
        loaded = Loaded(main=LoadedModel(model=backend.models["main"], tokenizer=backend.tokenizer(), name="main"),
                        drift_profile=None if resources is None else resources.drift_profile,
                        steer_key="steer" if "steer" in backend.models else "main")
        for req in cls.requires:
            loaded.unmet[req] = f"it needs {REQUIREMENTS[req]}"
    for req in cls.requires:
        met = {"persrm": loaded.persrm, "reward": loaded.scorer, "pdpo": loaded.pdpo}[req] is not None
        if not met:
            why = loaded.unmet.get(req) or f"it needs {REQUIREMENTS[req]}"
            raise ValueError(f"method {name!r} cannot be built: {why}")
    return cls.from_resources(method_config(name, params), loaded)


def build_methods(names: Sequence[str], backend: Backend, resources: Resources | None = None, *,
                  params: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[dict[str, Method], dict[str, str]]:
    """Every method of ``names`` that can be built on ``backend`` (with ``params[name]``, else its default
    config), and why each other one cannot (what a server serves)."""
    methods, unavailable = {}, {}
    for name in names:
        try:
            methods[name] = build_method(name, (params or {}).get(name), backend, resources)
        except (ValueError, OSError) as e:
            unavailable[name] = str(e).replace(f"method {name!r} cannot be built: ", "")
    return methods, unavailable


# ----------------------------------------------------------------------------- attaching
def attach_persrm(backend: HFBackend, persrm: PersRM, *, shared: bool | None = None, views: bool = True) -> bool:
    """Register ``persrm``'s views on ``backend`` (before decoding; ``views=False``: only as a reward
    scorer, no PAD views); returns whether it shares the main model's weights. Sharing (the PersRM was
    loaded onto the main model): the main model becomes an adapter-free view of the same weights, so
    every other view of ``main`` stays the base model."""
    main = backend.models["main"]
    if shared is None:
        shared = main is persrm.base_lm or (isinstance(main, RowAdapterModel) and main.peft_model is persrm.lm)
    if shared and main is persrm.base_lm:
        backend.add_model("main", RowAdapterModel(persrm.lm, (BASE_ADAPTER,)), replace=True)
    for key, view in (pad_views(persrm, shared) if views else {}).items():
        if key not in backend.models:
            backend.add_model(key, view, persrm.tokenizer)
    return shared


def attach_reward_view(backend: HFBackend, scorer: RewardScorer) -> str | None:
    """Register a reward model that shares the policy's tokenizer as the cached reward view
    ``"reward"`` (ARGS scores its candidates on the cache); None for any other scorer."""
    if not isinstance(scorer, HFRewardScorer):
        return None
    tok, main_tok = scorer.tokenizer, backend.tokenizer()
    if not (tok is main_tok or (len(tok) == len(main_tok) and tok.get_vocab() == main_tok.get_vocab())):
        return None
    backend.add_model("reward", RewardLMView.from_classifier(scorer.model, backend.vocab_size, scorer.label), tok,
                      replace=True)
    return "reward"


# ----------------------------------------------------------------------------- loading
def _load_persrm(resources: Resources, main: LoadedModel, models: dict[str, Any]) -> tuple[PersRM, bool]:
    """The PersRM onto the main model when that is its backbone (shared), else with its own backbone."""
    if isinstance(resources.persrm, PersRM):
        rm = resources.persrm
        return rm, rm.base_lm is main.model
    ckpt = str(resources.persrm)
    cfg = PersRM.read_config(ckpt)
    if backbone_fingerprint(main.model, main.tokenizer) == cfg.fingerprint:
        return PersRM.load(ckpt, main.model, main.tokenizer, device=resources.device_name), True
    logger.info("the base model is not the PersRM's backbone: loading %s separately", cfg.backbone)
    rm = PersRM.load(ckpt, device=resources.device_name)
    check_same_tokenizer(main.tokenizer, rm.tokenizer, "main", "persrm")
    return rm, False


def _reward_scorer(resources: Resources, loaded: Loaded, backend: HFBackend) -> RewardScorer:
    """The reward of ``reward_model``, else ``reward_function``, else the PersRM."""
    if resources.reward_model is not None:
        if not isinstance(resources.reward_model, str):
            return resources.reward_model
        return load_reward_scorer(resources.reward_model, device=str(backend.device()), label=resources.reward_label)
    if resources.reward_function is not None:
        fn = resources.reward_function
        if isinstance(fn, str):
            target, fn = fn, import_object(fn)
            if not callable(fn):
                raise ValueError(f"`reward_function` {target!r} is not callable.")
            return FunctionScorer(fn, name=target)
        return FunctionScorer(fn)
    if loaded.persrm is not None:
        return PersRMScorer(loaded.persrm)  # each request's own preference
    raise ValueError(f"it needs {REQUIREMENTS['reward']}")


def _load_pdpo(resources: Resources, loaded: Loaded, models: dict[str, Any], tokenizers: dict[str, Any]) -> None:
    """The P-DPO adapter into the main model, or (``shared``) into its own copy of the base model."""
    directory = resources.pdpo_checkpoint
    if not directory:
        raise ValueError(f"it needs {REQUIREMENTS['pdpo']}")
    if not Path(directory).is_dir():
        raise ValueError(f"`checkpoint` {directory!r} does not exist (a directory from `personalign train pdpo`).")
    main = loaded.main
    if resources.shared:
        base = copy.deepcopy(main) if isinstance(resources.model, LoadedModel) else _main_model(resources)
        key = "pdpo"
    else:
        base, key = main, "main"
    ck = load_checkpoint(directory, base.model, name=main.name, merge=True)
    models[key], tokenizers[key] = ck.lm, base.tokenizer
    end_id = ck.config.get("train", {}).get("end_token_id", -1)
    _add_end_token(ck.lm, end_id)
    if key != "main" and end_id is not None and end_id >= 0 and end_id != base.tokenizer.eos_token_id:
        logger.warning("pdpo: the checkpoint's end token %d is not the tokenizer's EOS; on the model key %r "
                       "generation stops at the main model's EOS ids only", end_id, key)
    loaded.pdpo = (ck.users, ck.index, key)


def _add_end_token(model: Any, end_id: int | None) -> None:
    """Make the id that ended the training responses stop generation too (the loop reads generation_config)."""
    cfg = getattr(model, "generation_config", None)
    if end_id is None or end_id < 0 or cfg is None:
        return
    ids = cfg.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if end_id not in ids:
        cfg.eos_token_id = [*ids, int(end_id)]
