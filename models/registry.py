"""Backends from command-line specs: ``embedded``, ``embedded:<model>``, ``echo``.

A spec is ``<kind>`` or ``<kind>:<argument>``; ``FACTORIES`` maps each kind to a function
building a backend from the argument. New kinds plug in there: ``openai:<url>`` for
OpenAI-compatible servers, and later backends found through an entry-point group.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .base import Backend, ModelError
from .embedded import EMBEDDED_MODELS, EchoBackend, EmbeddedBackend

# factory(argument or None, offload) -> Backend; raises ModelError on a bad argument.
Factory = Callable[[str | None, bool], Backend]


def _embedded(argument: str | None, offload: bool) -> Backend:
    return EmbeddedBackend(offload=offload, models=None if argument is None else [argument])


def _echo(argument: str | None, offload: bool) -> Backend:
    if argument is None:
        return EchoBackend()
    try:
        delay = float(argument)
    except ValueError:
        delay = -1.0
    if not 0.0 <= delay < float("inf"):
        raise ModelError(f"echo:<delay> wants a delay in seconds, not {argument!r}")
    return EchoBackend(delay=delay)


FACTORIES: dict[str, Factory] = {"embedded": _embedded, "echo": _echo}

VALID_SPECS = (
    "embedded",
    *(f"embedded:{name}" for name in EMBEDDED_MODELS),
    "echo",
    "echo:<delay seconds>",
)


def load_backends(specs: Sequence[str], *, offload: bool = True) -> list[Backend]:
    """One backend per spec; two specs may not serve the same model name."""
    backends: list[Backend] = []
    served: dict[str, str] = {}
    for spec in specs:
        kind, colon, argument = spec.partition(":")
        factory = FACTORIES.get(kind)
        if factory is None or (colon and not argument):
            raise ModelError(f"unknown backend {spec!r}; valid: {', '.join(VALID_SPECS)}")
        try:
            backend = factory(argument if colon else None, offload)
        except ModelError as exc:
            raise ModelError(f"backend {spec!r}: {exc}; valid: {', '.join(VALID_SPECS)}") from exc
        for info in backend.models():
            if info.name in served:
                raise ModelError(f"model {info.name!r} is served by both {served[info.name]!r} and {spec!r}")
            served[info.name] = spec
        backends.append(backend)
    return backends
