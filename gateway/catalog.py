"""What the network offers as seen from one node, and what a model name in a request means.

Discovery: the DHT indexes providers by capability tag, not as one list, so the catalog
looks up a fixed set of well-known task tags (:data:`DISCOVERY_TAGS`, extendable in the
gateway's config) plus every task this node serves or was asked about, concurrently and
each within a time bound, and lists the models the verified records of those providers
declare. The list is kept for ``ttl`` seconds. A model that serves none of those tasks is
still reachable by name: :meth:`Catalog.resolve` looks up its ``model:<name>`` tag.

Unless ``private`` (the gateway's ``serve_private``), the catalog sees what an anonymous
peer sees: this node's models under a non-public access policy are left out, and lookups
search public records only, never the private ones of the node's organisations.

A name resolves, in this order, to a registered plan, to ``task:<tag>`` (any model of
that capability), or to a model name (the ``model:<name>`` capability, that model only).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import trio

from modelnet.errors import ModelNetError
from modelnet.p2p.node import Node, Provider
from modelnet.p2p.serving import ServedModel
from modelnet.protocols import capability as cap
from modelnet.protocols.errors import ProtocolError

from .errors import ApiError

logger = logging.getLogger(__name__)

TASK_PREFIX = "task:"
DISCOVERY_TAGS = (
    "chat", "completion", "embed", "sentiment", "language-id", "keywords", "summarize",
    "classify", "translate", "echo",
)  # fmt: skip
OWNER = "modelnet"


@dataclasses.dataclass(frozen=True)
class Target:
    """What a request's ``model`` names."""

    id: str  # as the client wrote it
    kind: str  # "plan", "task" or "model"
    capability: str | None = None  # the tag asked of the network (None for a plan)
    model: str | None = None  # one model only, for kind "model"
    task: str | None = None  # the task, when known: decides which OpenAI parameters apply


@dataclasses.dataclass
class _Entry:
    task: str
    description: str = ""
    tags: tuple[str, ...] = ()
    providers: set[str] = dataclasses.field(default_factory=set)
    local: bool = False


class Catalog:
    def __init__(
        self,
        node: Node,
        plans: Iterable[str] = (),
        *,
        tags: Iterable[str] = DISCOVERY_TAGS,
        ttl: float = 30.0,
        lookup_timeout: float = 5.0,
        private: bool = False,
    ) -> None:
        self.node = node
        self.plans = frozenset(plans)
        self.tags = {cap.normalize_tag(tag) for tag in tags}
        self.ttl = ttl
        self.lookup_timeout = lookup_timeout
        self.private = private
        self._cached: tuple[float, list[dict[str, Any]]] | None = None
        self._lock = trio.Lock()

    async def resolve(self, name: str) -> Target:
        """The :class:`Target` ``name`` stands for, or a 404 naming it."""
        if name in self.plans:
            return Target(name, "plan")
        if name.startswith(TASK_PREFIX):
            tag = self._tag(name, name[len(TASK_PREFIX) :])
            self.tags.add(tag)  # list what people ask for
            return Target(name, "task", capability=tag, task=tag)
        tag = self._tag(name, cap.MODEL_TAG_PREFIX + name)
        served = self._local().get(name)
        if served is not None:
            return Target(name, "model", capability=tag, model=name, task=served.capability.task)
        for provider in await self._find(tag):
            for model in provider.models:
                if model.name == name:
                    return Target(name, "model", capability=tag, model=name, task=model.task)
        raise _unknown(name)

    async def entries(self) -> list[dict[str, Any]]:
        """``/v1/models`` entries: plans, then ``task:<tag>`` capabilities, then models."""
        async with self._lock:
            now = trio.current_time()
            if self._cached is None or self._cached[0] <= now:
                self._cached = (now + self.ttl, await self._discover())
            return self._cached[1]

    async def _discover(self) -> list[dict[str, Any]]:
        models: dict[str, _Entry] = {}
        for served in self._local().values():
            capability = served.capability
            entry = models.setdefault(capability.name, _Entry(capability.task, capability.description, capability.tags))
            entry.local = True
        found: dict[str, list[Provider]] = {}

        async def look_up(tag: str) -> None:
            found[tag] = await self._find(tag)

        tags = self.tags | {entry.task for entry in models.values()}
        async with trio.open_nursery() as nursery:
            for tag in sorted(tags):
                nursery.start_soon(look_up, tag)
        for providers in found.values():
            for provider in providers:
                for model in provider.models:
                    entry = models.setdefault(model.name, _Entry(model.task, model.description, model.tags))
                    entry.providers.add(str(provider.peer_id))
        return _listing(sorted(self.plans), models)

    def usable(self, served: ServedModel) -> bool:
        """Whether clients may use this node's model: one under a non-public access policy
        only if ``private``."""
        return self.private or served.info.name not in self.node.server.policies

    def _local(self) -> dict[str, ServedModel]:
        return {name: served for name, served in self.node.server.models.items() if self.usable(served)}

    async def _find(self, tag: str) -> list[Provider]:
        """Providers of ``tag``; nothing if the lookup fails or takes too long (logged)."""
        with trio.move_on_after(self.lookup_timeout):
            try:
                return await self.node.find(tag, anonymous=not self.private)
            except ModelNetError as exc:
                logger.info("looking up %s failed: %s", tag, exc)
                return []
        logger.info("looking up %s took longer than %g s", tag, self.lookup_timeout)
        return []

    @staticmethod
    def _tag(name: str, text: str) -> str:
        try:
            return cap.normalize_tag(text)
        except ProtocolError:
            raise _unknown(name) from None


def _unknown(name: str) -> ApiError:
    return ApiError(
        404,
        f"The model {name!r} does not exist on the network as seen from this node "
        "(GET /v1/models lists what it found; 'task:<capability>' asks for any model of a capability)",
        code="model_not_found",
        param="model",
    )


def _listing(plans: list[str], models: Mapping[str, _Entry]) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = [{"id": plan, "created": 0, "owned_by": OWNER, "modelnet": {"kind": "plan"}} for plan in plans]
    by_task: dict[str, list[str]] = {}
    for name, entry in models.items():
        by_task.setdefault(entry.task, []).append(name)
    for task in sorted(by_task):
        providers = set().union(*(models[name].providers for name in by_task[task]))
        local = any(models[name].local for name in by_task[task])
        entries.append({
            "id": TASK_PREFIX + task, "created": 0, "owned_by": OWNER,
            "modelnet": {"kind": "task", "models": sorted(by_task[task]), "providers": len(providers), "local": local},
        })  # fmt: skip
    for name in sorted(models):
        entry = models[name]
        entries.append({
            "id": name, "created": 0, "owned_by": OWNER,
            "modelnet": {"kind": "model", "task": entry.task, "tags": list(entry.tags), "description": entry.description,
                         "providers": len(entry.providers), "local": entry.local},
        })  # fmt: skip
    return entries
