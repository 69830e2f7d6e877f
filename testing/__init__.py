"""Script many modelnet peers in one process: for tests, benchmarks and the demo.

``open_swarm`` starts ``n`` nodes on any host factory (the in-memory network or real
libp2p hosts on loopback), joins them through the first node, publishes every node's
capabilities and returns when the network is ready to answer.

    async with open_memory_swarm(30, backends_for=lambda i: [EchoBackend()]) as swarm:
        answer = await swarm.nodes[5].ask("echo", "hello")
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import AsyncIterator, Callable, Sequence

import trio

from modelnet.identity import PrivateKey
from modelnet.models.base import Backend
from modelnet.p2p.host import Host
from modelnet.p2p.node import Config, Node

# Virtual wall-clock origin for the memory network: records carry absolute expiries, so
# every node of a simulated network must agree on a wall clock that follows trio's clock.
EPOCH = 1_800_000_000.0

HostFactory = Callable[[PrivateKey], contextlib.AbstractAsyncContextManager[Host]]


def seeded_key(index: int, seed: int = 0) -> PrivateKey:
    """A deterministic node key (tests and simulations only)."""
    material = index.to_bytes(4, "big") + seed.to_bytes(4, "big")
    return PrivateKey.from_seed(material.rjust(32, b"\x5a"))


def virtual_wall_clock() -> float:
    """A wall clock that follows trio's (virtual, under autojump_clock) clock."""
    return EPOCH + trio.current_time()


@dataclasses.dataclass
class Swarm:
    nodes: list[Node]
    network: object | None = None  # the MemoryNetwork, when there is one

    @property
    def bootstrap_addrs(self) -> list[str]:
        return self.nodes[0].addrs


@contextlib.asynccontextmanager
async def open_node(
    host_factory: HostFactory,
    key: PrivateKey,
    backends: Sequence[Backend] = (),
    config: Config = Config(),
    *,
    bootstrap: Sequence[str] = (),
    wall_clock: Callable[[], float] | None = None,
    publish: bool = True,
) -> AsyncIterator[Node]:
    """One running node: host up, serving, joined through ``bootstrap``, published."""
    async with host_factory(key) as host:
        kwargs = {"wall_clock": wall_clock} if wall_clock is not None else {}
        node = Node(host, key, backends, config, **kwargs)
        async with trio.open_nursery() as nursery:
            await nursery.start(node.serve, bootstrap)
            if publish and node.backends and not config.client_mode:
                await node.wait_published()
                await node.wait_warm()
            yield node
            nursery.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def open_swarm(
    n: int,
    host_factory: HostFactory,
    *,
    backends_for: Callable[[int], Sequence[Backend]] = lambda i: (),
    config: Config = Config(),
    seed: int = 0,
    wall_clock: Callable[[], float] | None = None,
    concurrency: int = 16,
    key_for: Callable[[int], PrivateKey] | None = None,
) -> AsyncIterator[Swarm]:
    """``n`` nodes joined through node 0, each published before this yields.

    Nodes join concurrently (at most ``concurrency`` at once), as volunteers would.
    """
    nodes: list[Node | None] = [None] * n
    key_for = key_for or (lambda i: seeded_key(i, seed))

    async def run_node(i: int, bootstrap: Sequence[str], *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with open_node(
            host_factory, key_for(i), backends_for(i), config, bootstrap=bootstrap, wall_clock=wall_clock
        ) as node:
            nodes[i] = node
            task_status.started()
            await trio.sleep_forever()

    limiter = trio.CapacityLimiter(concurrency)

    async with trio.open_nursery() as nursery:
        await nursery.start(run_node, 0, ())
        first_addrs = nodes[0].addrs

        async def join(i: int) -> None:
            async with limiter:
                await nursery.start(run_node, i, first_addrs)

        async with trio.open_nursery() as joiners:
            for i in range(1, n):
                joiners.start_soon(join, i)
        yield Swarm([node for node in nodes if node is not None])
        nursery.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def open_memory_swarm(
    n: int,
    *,
    backends_for: Callable[[int], Sequence[Backend]] = lambda i: (),
    config: Config = Config(),
    seed: int = 0,
    latency: float = 0.0,
    loss: float = 0.0,
) -> AsyncIterator[Swarm]:
    """A swarm on the in-memory network with the virtual wall clock."""
    from modelnet.p2p.memory import MemoryNetwork

    network = MemoryNetwork(latency=latency, loss=loss, seed=seed)
    async with open_swarm(
        n, network.open_host, backends_for=backends_for, config=config, seed=seed, wall_clock=virtual_wall_clock
    ) as swarm:
        swarm.network = network
        yield swarm
