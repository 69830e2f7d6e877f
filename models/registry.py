"""Backends from specs: ``embedded``, ``embedded:<model>``, ``echo``, ``openai:<url>``, plug-ins.

A spec is ``<kind>`` or ``<kind>:<argument>``. The kind is looked up in ``FACTORIES``
first, then among the plug-ins of the ``modelnet.backends`` entry-point group
(:mod:`modelnet.models.plugins`); a factory builds the backend from the argument.
Some backends (``openai:<url>`` without ``#model``) learn their models from their server:
:func:`discover_models` asks them, and must run before a node is built from the backends.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from modelnet.errors import unwrapping_groups

from . import plugins
from .base import Backend, ModelError
from .embedded import EMBEDDED_MODELS, EchoBackend, EmbeddedBackend

# factory(argument or None, offload) -> Backend; raises ModelError on a bad argument.
Factory = Callable[[str | None, bool], Backend]

MAX_MODELS = 64  # what one node's capability record holds


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


def _openai(argument: str | None, offload: bool) -> Backend:
    if argument is None:
        raise ModelError("openai wants the server's URL: openai:http://127.0.0.1:11434/v1[#model,…]")
    from .openai_http import OpenAIBackend  # httpx costs import time that other commands don't need

    return OpenAIBackend.from_spec(argument)


FACTORIES: dict[str, Factory] = {"embedded": _embedded, "echo": _echo, "openai": _openai}

VALID_SPECS = (
    "embedded",
    *(f"embedded:{name}" for name in EMBEDDED_MODELS),
    "echo",
    "echo:<delay seconds>",
    "openai:<url>[?key_env=VAR&timeout=S&context=N][#model[=chat|completion|embed],…]",
)


def valid_specs() -> list[str]:
    return [*VALID_SPECS, *(f"{name}[:<argument>] (plug-in)" for name in plugins.plugin_names() if name not in FACTORIES)]


def load_backend(spec: str, *, offload: bool = True) -> Backend:
    kind, colon, argument = spec.partition(":")
    if colon and not argument:
        raise ModelError(f"backend spec {spec!r} has an empty argument; valid: {'; '.join(valid_specs())}")
    factory = FACTORIES.get(kind)
    try:
        if factory is not None:
            return factory(argument if colon else None, offload)
        backend = plugins.load_plugin(kind, argument if colon else None, offload)
    except plugins.PluginError:
        raise
    except ModelError as exc:
        raise ModelError(f"backend {spec!r}: {exc}; valid: {'; '.join(valid_specs())}") from exc
    if backend is None:
        raise ModelError(f"unknown backend {spec!r}; valid: {'; '.join(valid_specs())}")
    return backend


def load_backends(specs: Sequence[str], *, offload: bool = True) -> list[Backend]:
    """One backend per spec; two specs may not serve the same model name."""
    backends = [load_backend(spec, offload=offload) for spec in specs]
    check_models(backends, specs)
    return backends


def check_models(backends: Sequence[Backend], specs: Sequence[str] | None = None) -> None:
    """Raise :class:`ModelError` if two backends serve one model name, or there are too many."""
    names = list(specs) if specs is not None else [backend.name for backend in backends]
    served: dict[str, str] = {}
    for backend, spec in zip(backends, names):
        for info in backend.models():
            if info.name in served:
                raise ModelError(f"model {info.name!r} is served by both {served[info.name]!r} and {spec!r}")
            served[info.name] = spec
    if len(served) > MAX_MODELS:
        raise ModelError(f"{len(served)} models; a node serves at most {MAX_MODELS}")


async def discover_models(backends: Sequence[Backend], specs: Sequence[str] | None = None) -> None:
    """Let every backend learn its models (concurrently), then check them together.

    Raises the backend's :class:`ModelError` when one cannot tell what it serves.
    """
    import trio

    with unwrapping_groups():
        async with trio.open_nursery() as nursery:
            for backend in backends:
                nursery.start_soon(backend.discover)
    check_models(backends, specs)
