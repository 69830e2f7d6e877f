"""A small memory network with a gateway on a real loopback port, and the official client."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, AsyncIterator, Callable, Mapping, Sequence

import openai
import trio

from modelnet.gateway import Config as GatewayConfig
from modelnet.gateway import Gateway, PlanRunner
from modelnet.identity import Membership
from modelnet.models.base import Backend, Chunk, ModelInfo, Output
from modelnet.p2p.memory import MemoryNetwork
from modelnet.p2p.node import Config, Node
from modelnet.protocols.access import AccessPolicy
from modelnet.testing import open_node, seeded_key, virtual_wall_clock

KEY = "sk-modelnet-test-key-0001"
GATEWAY = 99  # the gateway node's key index (providers are 1, 2, …)


@dataclasses.dataclass
class Net:
    providers: list[Node]
    node: Node  # the gateway's node
    gateway: Gateway
    url: str  # http://127.0.0.1:<port>
    client: openai.AsyncOpenAI


@contextlib.asynccontextmanager
async def open_gateway_network(
    providers: Sequence[Sequence[Backend] | tuple[Sequence[Backend], Config]],
    *,
    gateway_backends: Sequence[Backend] = (),
    gateway_config: GatewayConfig = GatewayConfig(port=0),
    plans: Mapping[str, PlanRunner] | None = None,
    api_key: str = KEY,
    memberships_for: Callable[[int], Sequence[Membership]] = lambda i: (),
    policies_for: Callable[[int], Mapping[str, AccessPolicy]] = lambda i: {},
) -> AsyncIterator[Net]:
    """A bootstrap node, one node per entry of ``providers``, and a gateway node (a light
    client unless it has backends) serving HTTP on 127.0.0.1, all joined on the memory
    network (real time: the HTTP side is real sockets). ``memberships_for(i)`` and
    ``policies_for(i)`` give node ``i`` (:data:`GATEWAY` for the gateway's) its
    organisations and its models' access policies."""
    network = MemoryNetwork()

    def opened(index: int, backends, config: Config, bootstrap):
        return open_node(
            network.open_host, seeded_key(index), backends, config, bootstrap=bootstrap, wall_clock=virtual_wall_clock,
            memberships=memberships_for(index), policies=policies_for(index),
        )  # fmt: skip

    async with contextlib.AsyncExitStack() as stack:
        first = await stack.enter_async_context(opened(0, (), Config(), ()))
        nodes = []
        for index, entry in enumerate(providers, 1):
            backends, config = entry if isinstance(entry, tuple) else (entry, Config())
            nodes.append(await stack.enter_async_context(opened(index, backends, config, first.addrs)))
        node = await stack.enter_async_context(
            opened(GATEWAY, gateway_backends, Config(client_mode=not gateway_backends), first.addrs)
        )
        gateway = Gateway(node, gateway_config, plans=plans, wall_clock=virtual_wall_clock)
        nursery = await stack.enter_async_context(trio.open_nursery())
        url = await nursery.start(gateway.serve)
        client = await stack.enter_async_context(openai.AsyncOpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0))
        yield Net(nodes, node, gateway, url, client)
        nursery.cancel_scope.cancel()


class Slow(Backend):
    """Streams one word, then waits for ever; records that it started and was cancelled."""

    def __init__(self, model: str = "slow-chat", task: str = "chat") -> None:
        self.name = f"slow-{model}"
        self.model = ModelInfo(model, task, streaming=True)
        self.started = trio.Event()
        self.cancelled = trio.Event()

    def models(self) -> list[ModelInfo]:
        return [self.model]

    async def run(self, model: str, text: str, params: Mapping[str, Any]) -> AsyncIterator[Chunk | Output]:
        self.info(model)
        self.started.set()
        yield Chunk("thinking ")
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            self.cancelled.set()
            raise
        yield Output("never")
