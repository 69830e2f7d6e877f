"""Backends from other Python packages, through the ``modelnet.backends`` entry-point group.

An organisation wraps its private model without forking modelnet: its package declares

    [project.entry-points."modelnet.backends"]
    acme = "acme_models.modelnet:make_backend"

and ``modelnet node --model acme:some-argument`` calls ``make_backend("some-argument",
offload)`` (``None`` for a bare ``--model acme``), which returns a
:class:`~modelnet.models.base.Backend`. Whatever goes wrong inside a plug-in (it does not
import, the factory raises, it returns something else) comes out as :class:`PluginError`
naming the plug-in, its entry point and its distribution.
"""

from __future__ import annotations

import importlib.metadata
import logging

from .base import Backend, ModelError

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "modelnet.backends"


class PluginError(ModelError):
    """A plug-in backend could not be loaded or built."""


def _entry_points(name: str | None = None) -> list[importlib.metadata.EntryPoint]:
    found = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    return [ep for ep in found if name is None or ep.name == name]


def plugin_names() -> list[str]:
    """The backend kinds installed plug-ins provide."""
    return sorted({ep.name for ep in _entry_points()})


def _describe(ep: importlib.metadata.EntryPoint) -> str:
    dist = ep.dist
    where = f" from {dist.name} {dist.version}" if dist is not None else ""
    return f"plug-in backend {ep.name!r} ({ep.value}{where})"


def load_plugin(name: str, argument: str | None, offload: bool) -> Backend | None:
    """The backend plug-in ``name`` builds from ``argument``; None if no plug-in has that name."""
    candidates = _entry_points(name)
    if not candidates:
        return None
    # The same distribution can be seen twice on sys.path; different ones are a conflict.
    values = sorted({ep.value for ep in candidates})
    if len(values) > 1:
        raise PluginError(f"plug-in backend {name!r} is registered more than once: {', '.join(values)}")
    ep = candidates[0]
    what = _describe(ep)
    # A plug-in is foreign code: any exception from it becomes one clear, typed error here.
    try:
        factory = ep.load()
    except Exception as exc:
        raise PluginError(f"{what} cannot be loaded: {type(exc).__name__}: {exc}") from exc
    if not callable(factory):
        raise PluginError(f"{what} is not callable")
    try:
        backend = factory(argument, offload)
    except ModelError as exc:
        raise PluginError(f"{what}: {exc}") from exc
    except Exception as exc:
        raise PluginError(f"{what} failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(backend, Backend):
        raise PluginError(f"{what} returned {type(backend).__name__}, not a modelnet Backend")
    logger.info("loaded %s", what)
    return backend
