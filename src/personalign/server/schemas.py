"""Request bodies of the HTTP API (pydantic v2), and the server's limits.

The chat body follows OpenAI's ``/v1/chat/completions`` schema; fields OpenAI clients may send that
this server does not implement are accepted and ignored when they hold their no-op value and
rejected otherwise (``logprobs``, ``tools`` ... must be absent or null/false). ``n`` choices (up to
``Limits.max_n``) decode as rows of one batch.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
)

__all__ = ["Limits", "ChatMessage", "ChatRequest", "Personalization", "ProfileBody", "FeedbackBody", "KeyBody",
           "ID_RULE", "ID_PATTERN", "check_id", "shown", "Text", "SEED_RANGE"]

SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Bounds on what one request may ask for: every text the server feeds a model is bounded here.

    Attributes:
        max_body_bytes: request body size.
        max_messages: chat messages per request.
        max_message_chars: characters of one message's content.
        max_tokens: the largest ``max_tokens`` a request may ask for (also the default).
        default_max_tokens: ``max_tokens`` when a request leaves it out.
        max_stop: stop strings per request.
        max_id_chars: characters of a user or feedback id (``ID_RULE`` says which characters).
        max_preference_chars: a stated preference (profile or request) and every string method parameter
            (e.g. P-DPO's ``user_text``).
        max_feedback_chars: each of a feedback item's prompt (all messages together), chosen and rejected text.
        max_feedback_tokens: tokens of each sequence a fold scores (the templated prompt under an attribute
            prompt, then one reply), under the steering model's tokenizer; also bounded by its context.
        max_folds: feedback items waiting to be folded or folding; beyond it ``POST /v1/feedback`` is 429.
        max_n: choices per chat completion (``n``).
    """

    max_body_bytes: int = 1 << 20
    max_messages: int = 64
    max_message_chars: int = 32_000
    max_tokens: int = 1024
    default_max_tokens: int = 256
    max_stop: int = 4
    max_id_chars: int = 128
    max_preference_chars: int = 2_000
    max_feedback_chars: int = 8_000
    max_feedback_tokens: int = 1_024
    max_folds: int = 64
    max_n: int = 4

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"`{f.name}` must be an integer >= 1, got {v!r}.")
        if self.default_max_tokens > self.max_tokens:
            raise ValueError(f"`default_max_tokens` ({self.default_max_tokens}) must be <= `max_tokens` ({self.max_tokens}).")


# User and feedback ids: they appear in URLs and must stay addressable and erasable.
ID_RULE = "letters, digits and . _ : @ + -, starting with a letter or digit"
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+\-]*")  # the whole id must match (``fullmatch``)
_ID = ID_PATTERN


def check_id(value: str, field: str, limit: int) -> str | None:
    """None when ``value`` is a valid id, else the message of the 400 (naming ``field`` and the rule)."""
    if len(value) > limit:
        return f"`{field}` is {len(value)} characters; the limit is {limit}."
    if not _ID.fullmatch(value):
        return f"`{field}` must be 1-{limit} characters of {ID_RULE}; got {shown(value)}."
    return None


def shown(value: str, limit: int = 64) -> str:
    """``value`` quoted for a message, cut to ``limit`` characters (error bodies never echo a huge id)."""
    v = value if len(value) <= limit else value[:limit] + "…"
    return repr(v)


def _no_surrogates(text: str) -> str:
    """Reject unpaired UTF-16 surrogates (``"\\ud800"`` in JSON): no tokenizer can encode them."""
    for i, ch in enumerate(text):
        if "\ud800" <= ch <= "\udfff":
            raise ValueError(f"contains an unpaired surrogate (U+{ord(ch):04X}) at character {i}; send valid UTF-16 "
                             "pairs or plain Unicode")
    return text


Text = Annotated[StrictStr, AfterValidator(_no_surrogates)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ContentPart(_Body):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. "name"
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[ContentPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class Personalization(BaseModel):
    """``method`` (or ``methods``: one choice per method), ``preference``, ``profile_id``; any other key is
    a method parameter (of every method named)."""

    model_config = ConfigDict(extra="allow")
    method: StrictStr | None = None
    methods: list[StrictStr] | None = Field(default=None, min_length=1)
    preference: Text | None = None
    profile_id: StrictStr | None = None
    # ``explore``: with ``n`` >= 2 and a learned Drift profile, choices after the first decode with draws
    # of the user's weights (``learners.drift.thompson_profile``) instead of the estimate itself
    alternatives: Literal["same", "explore"] | None = None

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class StreamOptions(_Body):
    include_usage: StrictBool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: StrictStr
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    temperature: StrictFloat | StrictInt | None = None
    top_p: StrictFloat | StrictInt | None = None
    stop: Text | list[Text] | None = None
    seed: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt | None = None  # default 1, or one choice per `personalization.methods`
    user: StrictStr | None = None
    personalization: Personalization | None = None
    response_format: dict[str, Any] | None = None
    # accepted only with their no-op values
    logprobs: StrictBool | None = None
    tools: list[Any] | None = None
    presence_penalty: StrictFloat | StrictInt | None = None
    frequency_penalty: StrictFloat | StrictInt | None = None

    @field_validator("n")
    @classmethod
    def _positive(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"must be an integer >= 1 (the number of choices), got {v}")
        return v

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float | None) -> float | None:
        if v is not None and not 0 <= v <= 2:  # OpenAI's range
            raise ValueError(f"must lie in [0, 2], got {v}")
        return v

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int | None) -> int | None:
        if v is not None and not SEED_RANGE[0] <= v <= SEED_RANGE[1]:
            raise ValueError("must be an integer in [-2**63, 2**64 - 1]")
        return v

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, v: dict | None) -> dict | None:
        if v is not None and v.get("type", "text") != "text":
            raise ValueError(f"only {{\"type\": \"text\"}} is supported (no JSON mode or schema), got {v.get('type')!r}")
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: bool | None) -> bool | None:
        if v:
            raise ValueError("logprobs are not supported")
        return v

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, v: list | None) -> list | None:
        if v:
            raise ValueError("tools are not supported")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: float | None) -> float | None:
        if v:
            raise ValueError("presence and frequency penalties are not supported; send 0 or leave them out")
        return v


class ProfileBody(_Body):
    """Create (``user`` required) or update (fields given are set) a profile."""

    user: StrictStr | None = None
    preference: Text | None = None
    method: StrictStr | None = None
    params: dict[str, Any] | None = None
    drift_profile: dict[str, Any] | None = None
    pdpo_user_id: Text | None = Field(default=None, min_length=1, max_length=200)
    pdpo_embedding: dict[str, Any] | None = None
    learner: StrictStr | None = None  # what the user's feedback teaches (``GET /health``'s ``learners``)
    learner_params: dict[str, Any] | None = None  # that learner's settings for this user
    incontext: dict[str, Any] | None = None  # the in-context learner's state (its hypothesis)


class FeedbackBody(_Body):
    """A pairwise choice: ``prompt``/``chosen``/``rejected`` texts, completion ids, or the choice a user
    made among a completion's ``n`` choices (``completion_id`` + ``chosen_index``: ``n − 1`` pairs).

    ``wait`` (default true): answer once the item is folded into the user's profile (201); false:
    answer 202 at once with the stored item, which ``GET /v1/feedback/{id}`` shows ``folded`` later.
    """

    id: StrictStr
    user: StrictStr | None = None  # required except with `completion_id` (default: the completion's user)
    prompt: Text | list[ChatMessage] | None = None
    chosen: Text | None = None
    rejected: Text | None = None
    chosen_completion_id: StrictStr | None = None
    rejected_completion_id: StrictStr | None = None
    completion_id: StrictStr | None = None
    chosen_index: StrictInt | None = None
    wait: StrictBool = True


class KeyBody(_Body):
    name: Text = Field(default="", max_length=200)
