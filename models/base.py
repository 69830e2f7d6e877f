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
from collections.abc import AsyncIterator, Collection, Mapping
from typing import Any

from modelnet.errors import ModelNetError


class ModelError(ModelNetError):
    """Base of model errors; also raised when a model fails while running."""


class UnknownModel(ModelError):
    """A model name this backend does not serve."""


class InvalidInput(ModelError):
    """Empty or oversized text, or bad parameters."""


@dataclasses.dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str  # e.g. "vader-sentiment"
    task: str  # the capability users ask for: "sentiment", "language-id", "summarize", ...
    tags: tuple[str, ...] = ()  # domain tags, e.g. ("english", "lexicon")
    description: str = ""
    max_input_bytes: int = 16384  # UTF-8 bytes of the input text
    streaming: bool = False


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
