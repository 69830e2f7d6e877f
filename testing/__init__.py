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
import time
from typing import Any, AsyncIterator, Callable, Mapping, Sequence

import trio

from modelnet.errors import unwrapping_groups
from modelnet.identity import Membership, PrivateKey
from modelnet.models.base import Backend, Chunk, ModelError, ModelInfo, Output
from modelnet.p2p.host import Host
from modelnet.p2p.node import Config, Node
from modelnet.protocols.access import AccessPolicy

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


class ScriptedBackend(Backend):
    """A model whose timing a test or benchmark sets, and which reports what happened to it.

    It answers ``<label>:<input>`` after ``chunks`` chunks (``<label>-0``, ``<label>-1``…):
    ``delay`` seconds before the first (change it between requests to make a provider slow),
    ``chunk_delay`` between the others. ``fail`` raises :class:`ModelError` before anything.
    ``started``/``finished``/``cancelled`` count runs; ``first_chunk`` is set once a chunk
    was yielded and ``was_cancelled`` once a run was cancelled.
    """

    def __init__(
        self, label: str, task: str = "echo", *, delay: float = 0.0, chunks: int = 1, chunk_delay: float = 0.0, fail: bool = False
    ) -> None:
        self.name = f"scripted-{label}"
        self.label = label
        self.task = task
        self.delay = delay
        self.chunks = chunks
        self.chunk_delay = chunk_delay
        self.fail = fail
        self.started = self.finished = self.cancelled = 0
        self.first_chunk = trio.Event()
        self.was_cancelled = trio.Event()

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(name=self.name, task=self.task, streaming=True)]

    async def run(self, model: str, text: str, params: Mapping[str, Any]) -> AsyncIterator[Chunk | Output]:
        self.started += 1
        if self.fail:
            raise ModelError(f"{self.label} is broken")
        try:
            if self.delay:
                await trio.sleep(self.delay)
            for index in range(self.chunks):
                if index and self.chunk_delay:
                    await trio.sleep(self.chunk_delay)
                yield Chunk(f"{self.label}-{index}")
                self.first_chunk.set()
            yield Output(f"{self.label}:{text}")
        except trio.Cancelled:
            self.cancelled += 1
            self.was_cancelled.set()
            raise
        self.finished += 1


def _node(
    host: Host,
    key: PrivateKey,
    backends,
    config: Config,
    wall_clock: Callable[[], float] | None,
    memberships: Sequence[Membership] = (),
    policies: Mapping[str, AccessPolicy] = {},
) -> Node:
    return Node(
        host, key, backends, config, wall_clock=wall_clock or time.time, memberships=memberships, policies=policies
    )


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
    memberships: Sequence[Membership] = (),
    policies: Mapping[str, AccessPolicy] = {},
) -> AsyncIterator[Node]:
    """One running node: host up, serving, joined through ``bootstrap``, published.

    ``memberships`` and ``policies`` are the node's organisations and access policies.
    """
    with unwrapping_groups():
        async with host_factory(key) as host:
            node = _node(host, key, backends, config, wall_clock, memberships, policies)
            async with trio.open_nursery() as nursery:
                await nursery.start(node.serve, bootstrap)
                if publish and node.server.models and not config.client_mode:
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
    memberships_for: Callable[[int], Sequence[Membership]] = lambda i: (),
    policies_for: Callable[[int], Mapping[str, AccessPolicy]] = lambda i: {},
) -> AsyncIterator[Swarm]:
    """``n`` nodes joined through node 0, each published before this yields.

    Nodes join concurrently (at most ``concurrency`` at once), as volunteers would.
    ``memberships_for(i)`` and ``policies_for(i)`` give node ``i`` its organisations and
    the access policies of its models.
    """
    nodes: list[Node | None] = [None] * n
    key_for = key_for or (lambda i: seeded_key(i, seed))

    async def run_node(i: int, bootstrap: Sequence[str], *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with open_node(
            host_factory,
            key_for(i),
            backends_for(i),
            config,
            bootstrap=bootstrap,
            wall_clock=wall_clock,
            memberships=memberships_for(i),
            policies=policies_for(i),
        ) as node:
            nodes[i] = node
            task_status.started()
            await trio.sleep_forever()

    limiter = trio.CapacityLimiter(concurrency)

    with unwrapping_groups():
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
    key_for: Callable[[int], PrivateKey] | None = None,
    memberships_for: Callable[[int], Sequence[Membership]] = lambda i: (),
    policies_for: Callable[[int], Mapping[str, AccessPolicy]] = lambda i: {},
) -> AsyncIterator[Swarm]:
    """A swarm on the in-memory network with the virtual wall clock."""
    from modelnet.p2p.memory import MemoryNetwork

    network = MemoryNetwork(latency=latency, loss=loss, seed=seed)
    async with open_swarm(
        n,
        network.open_host,
        backends_for=backends_for,
        config=config,
        seed=seed,
        wall_clock=virtual_wall_clock,
        key_for=key_for,
        memberships_for=memberships_for,
        policies_for=policies_for,
    ) as swarm:
        swarm.network = network
        yield swarm


def oracle_join(nodes: Sequence[Node], *, now: float | None = None, seed: int = 0) -> None:
    """Fill every node's routing table as if bootstrap and refresh had converged.

    Simulations only (benchmarks of 1,000+ nodes, where real joins cost minutes of CPU):
    each node gets, in each of its k-buckets, up to k of the nodes that belong there (a
    seeded choice among all of them), through the table's public ``add``. Nothing is sent;
    light clients are left out of every table. Call it from inside trio (``now`` defaults
    to the current trio time).
    """
    import bisect
    import random

    from modelnet.p2p.kad.table import KEY_BITS, kad_key

    now = trio.current_time() if now is None else now
    rng = random.Random(seed)
    servers = sorted(
        (kad_key(node.peer_id.bytes), node.peer_id, tuple(node.host.listen_addrs()))
        for node in nodes
        if not node.config.client_mode
    )
    keys = [entry[0] for entry in servers]
    for node in nodes:
        table = node.dht.routing_table
        own = kad_key(node.peer_id.bytes)
        for shared in range(KEY_BITS):
            # Bucket ``shared`` holds the keys equal to ours in the first ``shared`` bits and
            # different in the next one: one contiguous range of the sorted keyspace.
            width = KEY_BITS - shared - 1
            start = ((own >> width) ^ 1) << width
            low, high = bisect.bisect_left(keys, start), bisect.bisect_left(keys, start + (1 << width))
            for index in rng.sample(range(low, high), min(table.k, high - low)):
                _, peer, addrs = servers[index]
                table.add(peer, addrs, now)
            # Nobody else shares the first ``shared + 1`` bits with us: deeper buckets are empty.
            near = own >> width << width
            if bisect.bisect_left(keys, near + (1 << width)) - bisect.bisect_left(keys, near) <= 1:
                break


@contextlib.asynccontextmanager
async def open_oracle_swarm(
    n: int,
    host_factory: HostFactory,
    *,
    backends_for: Callable[[int], Sequence[Backend]] = lambda i: (),
    config: Config = Config(),
    seed: int = 0,
    wall_clock: Callable[[], float] | None = None,
    key_for: Callable[[int], PrivateKey] | None = None,
) -> AsyncIterator[Swarm]:
    """``n`` nodes joined by :func:`oracle_join` instead of bootstrap lookups (simulations only).

    Every host is up and every table filled before any node serves; then all nodes start
    serving at once and those with backends publish through the DHT as after a real join.
    Yields once every record is published.
    """
    nodes: list[Node | None] = [None] * n
    key_for = key_for or (lambda i: seeded_key(i, seed))
    go = trio.Event()

    async def run_node(i: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        key = key_for(i)
        async with host_factory(key) as host:
            node = nodes[i] = _node(host, key, backends_for(i), config, wall_clock)
            task_status.started()
            await go.wait()
            await node.serve()

    with unwrapping_groups():
        async with trio.open_nursery() as nursery:
            for i in range(n):
                await nursery.start(run_node, i)
            ready = [node for node in nodes if node is not None]
            oracle_join(ready, seed=seed)
            go.set()
            for node in ready:
                if node.server.models and not config.client_mode:
                    await node.wait_published()
            yield Swarm(ready)
            nursery.cancel_scope.cancel()
