"""The learner contract: how a user's choices become state that shapes their later answers.

A learner (one file per learner, registered in ``LEARNERS``) owns one piece of state per user — a
versioned JSON object the store keeps per (user, learner) and the profile shows under the learner's
``field`` — and says:

* ``learns(profile)``: whether it learns for this user (their profile's ``learner``, or today's rule
  where the profile names none);
* ``prepare(pairs, profile)``: the checks and the plan of one feedback item, before any model work
  (``FoldRejected``, a 400, names the field);
* ``ahead(plan, tasks)``: model work that does not depend on the user's state, run as soon as the item
  is stored (Drift's scoring);
* ``learn(plan, ahead, state, item, prior, tasks)``: model work after the user's earlier items have
  merged, from their state (the P-DPO embedding fit, the in-context hypothesis);
* ``merge(state, plan, result, item)``: the cheap update, run under the profile's version check with
  every other learner's in one transaction; it returns the new state and what to keep with the item
  (``Merge.learned``) to undo it later;
* ``undo(state, item, before)``: the state without a deleted item, and whether the user's later items
  must be replayed (``replay``) to get there exactly;
* ``request(state, view)``: what the state gives a request (method parameters, a preference text).

Model work goes through ``Tasks`` (the engine's folding budget and rounds; never a hidden forward).
The server's ``FoldManager`` keeps the generic queue, the order of a user's items and the merge.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from personalign.config import config_from_mapping
from personalign.personas.drift import PreferencePair
from personalign.registry import Registry

__all__ = ["Learner", "LearnerEnv", "LEARNERS", "FoldRejected", "Tasks", "Item", "Merge", "Undo", "RequestView", "Contribution",
           "learner_names", "state_fields", "field_learner", "state_before", "make_learners"]


class FoldRejected(ValueError):
    """A feedback item a learner will not fold: ``field`` and the reason (a 400)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class Item(Protocol):
    """A stored feedback item as a learner reads it (``server.store_tables.StoredFeedback``)."""

    feedback_id: str
    user_id: str
    prompt: list
    chosen: str
    learned: dict | None
    pk: int

    @property
    def rejected_texts(self) -> list[str]: ...

    @property
    def stale(self) -> bool: ...

    def pairs(self) -> list[PreferencePair]: ...


class Tasks(Protocol):
    """The model work a learner may ask of the engine, inside its folding budget and rounds. Each
    returns None once the item's fold was cancelled (a delete)."""

    async def score(self, rows: list[tuple[list[int], list[int]]], model: str) -> list[Any] | None:
        """Per-token log-probs of teacher-forced rows ``(prompt_ids, response_ids)``."""

    async def run(self, task: Any, model: str) -> Any | None:
        """A task with ``advance(tokens)`` and ``done`` (e.g. an embedding fit), run in bounded pieces."""

    async def generate(self, messages: list[dict[str, str]], max_tokens: int) -> str | None:
        """The ``base`` method's greedy reply, decoded in the engine's batched rounds."""


@dataclass
class Merge:
    """A learner's part of one merge: its new ``state`` and what the item keeps (``learned``: None keeps
    nothing) so a delete can go back to the state before it."""

    state: dict[str, Any] | None
    learned: Any = None


@dataclass
class Undo:
    """A learner's part of a delete: the ``state`` without the item (``changed`` False: no change), and
    whether the user's later items must be ``replay``-ed to reach the state a fit without it gives."""

    state: dict[str, Any] | None = None
    changed: bool = False
    replay: bool = False


@dataclass
class RequestView:
    """What a learner sees of one chat request: the method it decodes with (the method object), the
    messages, the stated preference (request or profile), the user's profile, and a loader of the
    user's recent folded items (newest first), for learners that read them."""

    method: str
    method_obj: Any
    messages: list[dict[str, str]]
    stated: str | None
    profile: dict[str, Any]
    history: Callable[[int], Awaitable[list[Any]]] | None = None


@dataclass
class Contribution:
    """What a learner's state gives a request: method ``params`` and a ``preference`` text (None: none),
    and ``info`` shown in the response's ``personalization`` block."""

    params: dict[str, Any] = field(default_factory=dict)
    preference: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class LearnerEnv:
    """What a server gives its learners (``Learner.bind``): the engine's ``backend``, the served method
    objects, the model feedback is scored with (``steer_key``), whether prompts use the chat template,
    and the most tokens one scored sequence may hold."""

    backend: Any
    methods: dict[str, Any]
    steer_key: str
    chat_template: bool
    max_tokens: int


class Learner:
    """Base class of the learners (module docstring). Subclasses set ``name``, ``field`` and ``Config``
    and implement what they need; the defaults do no model work and keep no state."""

    name: ClassVar[str] = ""
    field: ClassVar[str] = ""  # the profile field that shows the state
    format: ClassVar[int] = 1  # the state's format version, stored with it
    Config: ClassVar[type] = type(None)
    methods: ClassVar[tuple[str, ...] | None] = None  # methods that read the state; None: see ``usable``

    def __init__(self, config: Any = None) -> None:
        self.config = config
        self.env: LearnerEnv | None = None

    def bind(self, env: LearnerEnv) -> str | None:
        """Attach the server's engine; returns why this learner cannot learn there (None: it can)."""
        self.env = env
        return None

    # -------------------------------------------------------------- whom it learns for
    def learns(self, profile: dict[str, Any]) -> bool:
        """Whether this learner learns from ``profile``'s user's feedback."""
        return profile.get("learner") == self.name

    def usable(self, method_obj: Any) -> str | None:
        """None when a request decoding with ``method_obj`` reads this learner's state, else why not."""
        if self.methods is None or method_obj.name in self.methods:
            return None
        return f"method {method_obj.name!r} does not read it (methods that do: {', '.join(self.methods)})"

    def check_state(self, state: Any) -> None:
        """``ValueError`` unless ``state`` reads as this learner's state (a client sets it on a profile)."""

    def check_params(self, params: dict[str, Any]) -> Any:
        """The profile's ``learner_params`` read as this learner's ``Config`` (``ValueError`` naming the key)."""
        if not dataclasses.is_dataclass(self.Config):
            if params:
                raise ValueError(f"learner {self.name!r} takes no parameters, got {sorted(params)}.")
            return self.config
        return config_from_mapping(self.Config, params, base=self.config)

    def config_for(self, profile: dict[str, Any]) -> Any:
        """This learner's settings for ``profile``: the server's, under its ``learner_params``."""
        params = profile.get("learner_params") or {}
        return self.check_params(params) if params and profile.get("learner") == self.name else self.config

    # -------------------------------------------------------------- one feedback item
    def prepare(self, pairs: list[PreferencePair], profile: dict[str, Any]) -> Any:
        """The item's plan (blocking: may tokenize); ``FoldRejected`` naming the field."""
        return None

    async def ahead(self, plan: Any, tasks: Tasks) -> Any:
        """Model work independent of the user's state; None when cancelled."""
        return True

    async def learn(self, plan: Any, ahead: Any, profile: dict[str, Any], item: Item, prior: Sequence[Item],
                    tasks: Tasks) -> Any:
        """Model work after the user's earlier items merged (``prior``: their folded items, newest
        first); the result ``merge`` receives. Default: ``ahead``'s result."""
        return ahead

    def merge(self, state: dict[str, Any] | None, plan: Any, result: Any, item: Item,
              profile: dict[str, Any]) -> Merge:
        """The new state (cheap, no model work; re-run alone on a profile conflict)."""
        return Merge(state)

    # -------------------------------------------------------------- deletes
    def undo(self, state: dict[str, Any] | None, item: Item, before: Any, profile: dict[str, Any],
             others: Sequence[Item] = ()) -> Undo:
        """The state without the deleted ``item`` (``before``: this learner's entry kept by the latest
        earlier item, ``state_before``; ``others``: the user's other folded items)."""
        return Undo()

    async def replay(self, profile: dict[str, Any], items: Sequence[Item], first: int, start: Any,
                     tasks: Tasks) -> tuple[dict[str, Any], dict[str, Any] | None] | None:
        """After a delete: ``items`` are the user's folded items in order, ``items[first:]`` the ones after
        the deleted one, ``start`` the state before them. Returns what each later item keeps
        (feedback id -> ``learned`` entry) and the final state; None when superseded."""
        return {}, start

    # -------------------------------------------------------------- requests
    async def request(self, state: dict[str, Any] | None, view: RequestView) -> Contribution:
        """What the state gives a request (module docstring)."""
        return Contribution()


LEARNERS: Registry[type[Learner]] = Registry("learner")


def learner_names() -> list[str]:
    return LEARNERS.names()


def state_fields() -> dict[str, str]:
    """Profile field -> learner name, for every registered learner."""
    return {LEARNERS.get(n).field: n for n in LEARNERS.names()}


def field_learner(name: str) -> str:
    """The profile field that shows learner ``name``'s state."""
    return LEARNERS.get(name).field


def state_before(items: Sequence[Item], index: int, name: str) -> Any:
    """Learner ``name``'s entry kept by the latest of ``items[:index]`` that kept one and is not stale:
    the state before ``items[index]`` (None: the learner's start). The one rule a delete and a replay
    use."""
    for f in reversed(items[:index]):
        if f.learned and not f.stale and name in f.learned:
            return f.learned[name]
    return None


def make_learners(configs: dict[str, Any] | None = None) -> dict[str, Learner]:
    """One instance of every registered learner, with ``configs[name]`` where given (else its defaults)."""
    configs = configs or {}
    out = {}
    for n in LEARNERS.names():
        cls = LEARNERS.get(n)
        cfg = configs.get(n)
        if cfg is None and dataclasses.is_dataclass(cls.Config):
            cfg = cls.Config()
        out[n] = cls(cfg)
    return out
