"""The one small interface every model backend implements, and its errors.

A backend serves one or more models. ``run`` is an async generator: zero or more
:class:`Chunk` (streamed pieces of text whose concatenation is the streamed text), then
exactly one :class:`Output` (the final, msgpack-able answer), last. Input and parameter
problems raise before anything is yielded, i.e. on the first ``__anext__``, so a router can
fail over without having forwarded a partial answer. Consumers should iterate inside
``contextlib.aclosing(...)`` so an abandoned run is closed promptly.

The helpers at the bottom check text and parameters the same way in every backend.
"""

from __future__ import annotations

import abc
import dataclasses
import json
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from typing import Any

from modelnet.errors import ModelNetError


class ModelError(ModelNetError):
    """Base of model errors; also raised when a model fails while running.

    ``str(error)`` is the full text, for local logs and local users. ``public`` is what a
    remote asker is told: by default the same text (backends' own messages), but a
    backend quoting something it does not control (a model server's error body, which
    may echo a key or internal details) passes a ``public`` text without it.
    """

    def __init__(self, message: str, *, public: str | None = None) -> None:
        super().__init__(message)
        self._public = public

    @property
    def public(self) -> str:
        return self._public if self._public is not None else str(self)


class UnknownModel(ModelError):
    """A model name this backend does not serve."""


class InvalidInput(ModelError):
    """Empty or oversized text, or bad parameters."""


class UpstreamError(ModelError):
    """A model server behind a backend failed: HTTP 5xx, refused our key, or answered nonsense.

    ``status`` is the HTTP status when there was one. Not the asker's fault: another
    provider may well succeed.
    """

    what = "upstream failed"  # the kind of failure, all a remote asker is told

    def __init__(self, message: str, status: int | None = None, *, public: str | None = None) -> None:
        super().__init__(message, public=public)
        self.status = status

    @property
    def public(self) -> str:
        """Never the model server's words: only what kind of failure, and the status."""
        if self._public is not None:
            return self._public
        return f"{self.what} (HTTP {self.status})" if self.status is not None else self.what


class UpstreamTimeout(UpstreamError):
    """The model server did not answer (or stopped streaming) within the backend's timeout."""

    what = "upstream timed out"


class UpstreamUnavailable(UpstreamError):
    """The model server could not be reached (connection refused, reset, DNS)."""

    what = "upstream unreachable"


class UpstreamBusy(UpstreamError):
    """The model server said it is overloaded (HTTP 429): busy, not broken."""

    what = "upstream busy"


@dataclasses.dataclass(frozen=True, slots=True)
class ModelInfo:
    """What a model declares about itself; the node publishes exactly this."""

    name: str  # e.g. "vader-sentiment"
    task: str  # the capability users ask for: "sentiment", "chat", "completion", "embed", ...
    tags: tuple[str, ...] = ()  # domain tags, e.g. ("english", "lexicon")
    description: str = ""
    max_input_bytes: int = 16384  # UTF-8 bytes of the input text
    streaming: bool = False
    context_length: int | None = None  # tokens of input and output together, when the model has a window
    max_output_tokens: int | None = None  # the most tokens one answer may have, when bounded


# Tasks whose input is a conversation or a prompt, and whose output is text.
CHAT = "chat"
COMPLETION = "completion"
EMBED = "embed"

# Chat input. Request params are scalars, so a whole conversation travels as the input
# text: with params ``{INPUT_FORMAT: MESSAGES}`` the input is a JSON list of
# ``{"role", "content"}``; otherwise the input is one user message.
INPUT_FORMAT = "input_format"
MESSAGES = "messages"
CHAT_ROLES = ("system", "user", "assistant", "developer", "tool")


@dataclasses.dataclass(frozen=True, slots=True)
class Chunk:
    """A streamed piece of output text."""

    text: str


@dataclasses.dataclass(frozen=True, slots=True)
class Output:
    """The final structured answer: str/int/float/bool/None/list/dict with str keys."""

    value: Any


class Backend(abc.ABC):
    name: str

    @abc.abstractmethod
    def models(self) -> list[ModelInfo]:
        """The models this backend serves."""

    @abc.abstractmethod
    def run(self, model: str, text: str, params: Mapping[str, Any]) -> AsyncIterator[Chunk | Output]:
        """Zero or more :class:`Chunk`, then exactly one :class:`Output`.

        Raises :class:`UnknownModel` or :class:`InvalidInput` before the first item.
        """

    async def discover(self) -> list[ModelInfo]:
        """Learn which models are served, for backends that only know at run time.

        A node is built from ``models()``, so whoever builds it awaits this first (see
        :func:`modelnet.models.registry.discover_models`). Default: nothing to learn.
        """
        return self.models()

    async def warm(self) -> None:
        """Load what the models need before the first request (default: nothing to load)."""

    def info(self, model: str) -> ModelInfo:
        for info in self.models():
            if info.name == model:
                return info
        served = ", ".join(info.name for info in self.models())
        raise UnknownModel(f"{self.name} does not serve {model!r} (it serves: {served})")


def check_text(info: ModelInfo, text: object) -> str:
    """Return ``text`` if it is a non-blank str within the model's byte limit."""
    if not isinstance(text, str):
        raise InvalidInput(f"input must be text, not {type(text).__name__}")
    if not text.strip():
        raise InvalidInput("input is empty")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:  # lone surrogates cannot go on the wire either
        raise InvalidInput("input is not valid Unicode text") from exc
    if size > info.max_input_bytes:
        raise InvalidInput(f"input of {size} bytes exceeds {info.name}'s limit of {info.max_input_bytes}")
    return text


def check_param_names(params: object, allowed: Collection[str]) -> Mapping[str, Any]:
    """Reject a non-mapping or unknown parameter names (a typo should not pass silently)."""
    if not isinstance(params, Mapping):
        raise InvalidInput(f"parameters must be a mapping, not {type(params).__name__}")
    unknown = sorted(str(name) for name in params if name not in allowed)
    if unknown:
        raise InvalidInput(f"unknown parameters {unknown}; accepted: {sorted(allowed)}")
    return params


def int_param(params: Mapping[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = params.get(name, default)
    # bool is an int subclass; True as a count is a caller bug, not 1.
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidInput(f"parameter {name!r} must be an integer in {low}..{high}, not {value!r}")
    return value


def str_param(params: Mapping[str, Any], name: str, default: str) -> str:
    value = params.get(name, default)
    if not isinstance(value, str):
        raise InvalidInput(f"parameter {name!r} must be text, not {type(value).__name__}")
    return value


def float_param(params: Mapping[str, Any], name: str, low: float, high: float) -> float:
    value = params[name]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidInput(f"parameter {name!r} must be a number in {low:g}..{high:g}, not {value!r}")
    return float(value)


def encode_messages(messages: Sequence[Mapping[str, str]]) -> tuple[str, dict[str, str]]:
    """A conversation as request input and params (see :data:`INPUT_FORMAT`)."""
    checked = _checked_messages(list(messages))
    return json.dumps(checked, ensure_ascii=False, separators=(",", ":")), {INPUT_FORMAT: MESSAGES}


def decode_messages(text: str, params: Mapping[str, Any]) -> list[dict[str, str]]:
    """The conversation a chat request carries: its JSON messages, or the text as one user turn."""
    fmt = params.get(INPUT_FORMAT, "text")
    if fmt == "text":
        return [{"role": "user", "content": text}]
    if fmt != MESSAGES:
        raise InvalidInput(f"parameter {INPUT_FORMAT!r} must be 'text' or {MESSAGES!r}, not {fmt!r}")
    try:
        messages = json.loads(text)
    except ValueError as exc:
        raise InvalidInput(f"input is not a JSON list of messages: {exc}") from None
    return _checked_messages(messages)


def _checked_messages(messages: object) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise InvalidInput("a conversation is a non-empty list of messages")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidInput(f"message {index} is not an object")
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise InvalidInput(f"message {index} has role {role!r}; valid: {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise InvalidInput(f"message {index} needs text content")
        checked.append({"role": role, "content": content})
    return checked
