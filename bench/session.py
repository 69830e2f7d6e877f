"""Session negotiation and record verification: what trust costs.

Measured in the same run, each against its own reference:

  (1) grants per second, provider side: K client tasks (on one light client node)
      negotiate sessions with one provider as fast as it answers, every grant fresh, for
      a public model and for a model whose policy asks for an organisation certificate;
      on the memory network and on loopback (libp2p TCP + Noise + Yamux), both ends in
      this process. Reference: the sans-IO work alone (offer verified, grant signed,
      certificate checked) in a loop, no network: the ceiling of one core.
  (2) added latency of the first request: ``ask`` with no cached grant (session round
      trip + request) against ``ask`` on a reused grant, loopback, provider list cached.
  (3) verification against lookup: verifying a capability record (signature, parse) and
      opening a private one (signature, decryption, parse) against the lookup that finds
      them (``find(fresh=True)``: DHT lookup + record fetch) on a memory network with
      per-link latency and on loopback: verification must not be the bottleneck.

Run: ``python -m bench.session [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Mapping

import trio

from modelnet.identity import Membership, PrivateKey, issue_certificate, records_key
from modelnet.models.base import Backend, Chunk, ModelInfo, Output
from modelnet.models.embedded import EchoBackend
from modelnet.p2p.libp2p_host import open_libp2p_host
from modelnet.p2p.memory import MemoryNetwork
from modelnet.p2p.node import Config, Node
from modelnet.protocols import access, private, session
from modelnet.protocols import capability as cap
from modelnet.testing import open_node, open_swarm, seeded_key

from .common import Report, Summary, arguments, ms, quiet_logging

ORG = seeded_key(900, seed=9)
# One client plays every asker: the per-peer limits (requests and session negotiations) are lifted.
PROVIDER_CONFIG = Config(
    max_concurrent_requests=64,
    max_requests_per_peer=64,
    requests_per_minute_per_peer=10**9,
    max_sessions_per_peer=64,
    sessions_per_minute_per_peer=10**9,
)
CLIENT_CONFIG = Config(client_mode=True, provider_cache_ttl=1e9)


class PrivateEcho(Backend):
    """Model ``private-echo`` (task ``private``): the input back, served to members of ORG only."""

    name = "private-echo"

    def models(self) -> list[ModelInfo]:
        return [ModelInfo("private-echo", "private")]

    async def run(self, model: str, text: str, params: Mapping[str, Any]) -> AsyncIterator[Chunk | Output]:
        yield Output(text)


def membership(key: PrivateKey, now: float) -> Membership:
    cert = issue_certificate(ORG, "bench", key.peer_id, now=now, expires=now + 86400)
    return Membership(cert, records_key(ORG))


def loopback_host(key):
    return open_libp2p_host(key, ["/ip4/127.0.0.1/tcp/0"])


def memory_factory(latency: float = 0.0) -> Callable:
    return MemoryNetwork(latency=latency).open_host


@asynccontextmanager
async def open_pair(host_factory) -> AsyncIterator[tuple[Node, Node]]:
    """A provider of a public and a private echo, and a member client joined through it."""
    now = time.time()
    provider_key, client_key = seeded_key(1, 9), seeded_key(2, 9)
    backends: list[Backend] = [EchoBackend(), PrivateEcho()]
    policies = {"private-echo": access.AccessPolicy(orgs=(ORG.peer_id,))}
    async with open_node(
        host_factory, provider_key, backends, PROVIDER_CONFIG, memberships=[membership(provider_key, now)], policies=policies
    ) as provider:
        async with open_node(
            host_factory, client_key, (), CLIENT_CONFIG, bootstrap=provider.addrs, memberships=[membership(client_key, now)]
        ) as client:
            yield provider, client


# ---- (1) grants per second -------------------------------------------------------------


def sans_io_grants(n: int, *, with_certificate: bool) -> float:
    """Grants per second of the protocol work alone: verify an offer, check a certificate,
    sign a grant (the client's side is prepared outside the timed loop)."""
    now = time.time()
    provider, client = seeded_key(1, 9), seeded_key(2, 9)
    credentials = (membership(client, now).certificate.encode(),) if with_certificate else ()
    policy = access.AccessPolicy(orgs=(ORG.peer_id,))
    offers = [session.ClientSession(client, provider=provider.peer_id, now=now).send_offer("echo", credentials, nonce=os.urandom(session.NONCE_BYTES)) for _ in range(n)]
    limits = session.Limits(8, 65536, 600)
    started = time.perf_counter()
    for data in offers:
        machine = session.ProviderSession(provider, remote=client.peer_id, now=now)
        machine.receive_data(data)
        offer = machine.next_event()
        if with_certificate:
            access.check_access(policy, peer=client.peer_id, credentials=offer.credentials, now=now, is_revoked=lambda org, peer: False)
        machine.send_grant(grant_id=os.urandom(session.GRANT_ID_BYTES), limits=limits, expires=now + 600)
    return n / (time.perf_counter() - started)


async def grants_per_second(client: Node, provider: Node, capability: str, concurrency: int, total: int) -> tuple[float, Summary]:
    latencies: list[float] = []
    remaining = total

    async def negotiate() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            client._grants.clear()  # every grant fresh: a full negotiation each time
            started = time.perf_counter()
            await client._grant_for(provider.peer_id, capability, org=ORG.peer_id if capability == "private" else None)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(negotiate)
    return total / (time.perf_counter() - started), Summary.of_seconds(latencies)


async def measure_grants(report: Report, total: int, levels: list[int]) -> None:
    rows = []
    for where, factory in (("memory", memory_factory()), ("loopback", loopback_host)):
        async with open_pair(factory) as (provider, client):
            for capability, label in (("echo", "public"), ("private", "org certificate")):
                await grants_per_second(client, provider, capability, 1, 20)  # warm-up: connection, caches
                for k in levels:
                    rate, latency = await grants_per_second(client, provider, capability, k, total)
                    rows.append([where, label, k, f"{rate:.0f}", ms(latency.p50), ms(latency.p99)])
    n = max(200, total)
    reference = [
        ["sans-IO only", "public", 1, f"{sans_io_grants(n, with_certificate=False):.0f}", "-", "-"],
        ["sans-IO only", "org certificate", 1, f"{sans_io_grants(n, with_certificate=True):.0f}", "-", "-"],
    ]
    report.table(
        "Grants per second, provider side (every grant a new negotiation)",
        ["network", "policy", "K", "grants/s", "p50 ms", "p99 ms"],
        reference + rows,
        note="K concurrent negotiating tasks on one member client node; both ends share this process "
        "(one core). 'sans-IO only': offer verified, certificate checked, grant signed, no I/O.",
    )
    report.data["grants"] = reference + rows


# ---- (2) first request against a reused grant -------------------------------------------


async def measure_first_request(report: Report, n: int) -> None:
    rows = []
    for where, factory in (("memory", memory_factory()), ("loopback", loopback_host)):
        async with open_pair(factory) as (provider, client):
            for capability, label in (("echo", "public"), ("private", "org certificate")):
                await client.ask(capability, "warm")
                first, reused = [], []
                for _ in range(n):
                    client._grants.clear()
                    started = time.perf_counter()
                    await client.ask(capability, "hello")
                    first.append(time.perf_counter() - started)
                    started = time.perf_counter()
                    await client.ask(capability, "hello")
                    reused.append(time.perf_counter() - started)
                a, b = Summary.of_seconds(first), Summary.of_seconds(reused)
                rows.append([where, label, n, ms(a.p50), ms(b.p50), ms(a.p50 - b.p50), ms(a.p99), ms(b.p99)])
    report.table(
        "Added latency of the first request (session negotiation) against a reused grant",
        ["network", "policy", "n", "first p50 ms", "reused p50 ms", "added p50 ms", "first p99 ms", "reused p99 ms"],
        rows,
        note="ask() with the provider list cached; 'first' has no grant and negotiates one (one more "
        "stream and round trip), 'reused' presents the grant it holds.",
    )
    report.data["first_request"] = rows


# ---- (3) verification against lookup ----------------------------------------------------


def verification_costs(n: int) -> tuple[float, float]:
    """Seconds to verify one public record, and to open one private record."""
    key = seeded_key(5, 9)
    models = (cap.ModelCapability("echo", "echo", ("test",)), cap.ModelCapability("private-echo", "private"))
    record = cap.CapabilityRecord(peer_id=key.peer_id, addrs=("/ip4/127.0.0.1/tcp/4001",), models=models)
    now = time.time()
    public = record.sign(key, seq=1, expires=now + 3600).encode()
    secret = records_key(ORG)
    certificate = issue_certificate(ORG, "bench", key.peer_id, now=now, expires=now + 86400)
    _, sealed = private.seal_record(key, record, records_key=secret, certificate=certificate, seq=1, expires=now + 3600, nonce=os.urandom(private.NONCE_BYTES))
    sealed_bytes = sealed.encode()
    started = time.perf_counter()
    for _ in range(n):
        cap.open_capability_record(public, now=now, peer=key.peer_id)
    public_cost = (time.perf_counter() - started) / n
    started = time.perf_counter()
    for _ in range(n):
        private.open_private_record(
            sealed_bytes, records_key=secret, org=ORG.peer_id, now=now, peer=key.peer_id, is_revoked=lambda org, member: False
        )
    return public_cost, (time.perf_counter() - started) / n


async def lookup_times(host_factory, nodes: int, lookups: int) -> tuple[Summary, Summary]:
    """find(fresh=True) of a public and of a private capability, by a member client."""
    now = time.time()
    policies = {"private-echo": access.AccessPolicy(orgs=(ORG.peer_id,))}
    providers = {3, 5}
    async with open_swarm(
        nodes,
        host_factory,
        backends_for=lambda i: [EchoBackend(), PrivateEcho()] if i in providers else [],
        memberships_for=lambda i: [membership(seeded_key(i, 9), now)],
        policies_for=lambda i: policies if i in providers else {},
        seed=9,
    ) as swarm:
        client = swarm.nodes[-1]
        out = []
        for capability in ("echo", "private"):
            samples = []
            for _ in range(lookups):
                started = time.perf_counter()
                found = await client.find(capability, fresh=True)
                samples.append(time.perf_counter() - started)
                client._records.clear()  # fetch and verify the records every time
                assert len(found) == len(providers), (capability, found)
            out.append(Summary.of_seconds(samples))
        return out[0], out[1]


async def measure_verification(report: Report, n: int, nodes: int, lookups: int) -> None:
    public_cost, private_cost = verification_costs(n)
    rows = [["verify one public record", "-", ms(public_cost * 1000), "-"],
            ["open one private record", "-", ms(private_cost * 1000), "-"]]  # fmt: skip
    for where, factory in (("memory, 5 ms links", memory_factory(0.005)), ("loopback", loopback_host)):
        public_lookup, private_lookup = await lookup_times(factory, nodes, lookups)
        for label, lookup, cost in (("public", public_lookup, public_cost), ("private", private_lookup, private_cost)):
            # a lookup verifies one record per provider found (2 here)
            share = 2 * cost * 1000 / lookup.p50
            rows.append([f"find {label} capability, {nodes} nodes, {where}", lookup.n, ms(lookup.p50), f"{100 * share:.2f} %"])
    report.table(
        "Verifying records against the lookup that finds them",
        ["what", "n", "p50 ms", "verification share of the lookup"],
        rows,
        note="Share: two providers' records verified (or opened) per lookup, over the lookup's p50. "
        "Lookups are find(fresh=True) by a member node, records fetched anew each time.",
    )
    report.data["verification"] = {"public_record_ms": public_cost * 1000, "private_record_ms": private_cost * 1000, "rows": rows}


def main() -> None:
    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--total", type=int, help="grants per row (default 2000, quick 200)")

    args = arguments(__doc__.split("\n")[0], options)
    quiet_logging()
    total = args.total or (200 if args.quick else 2000)
    levels = [1, 8] if args.quick else [1, 8, 32]
    first_n = 50 if args.quick else 300
    nodes, lookups = (10, 20) if args.quick else (20, 100)
    report = Report("session", "Session negotiation and record verification", {
        "quick": args.quick, "grants_per_row": total, "concurrency": levels, "first_request_iterations": first_n,
        "lookup_nodes": nodes, "lookups": lookups, "transport": "memory network and libp2p TCP+Noise+Yamux on 127.0.0.1",
    })  # fmt: skip
    trio.run(measure_grants, report, total, levels)
    trio.run(measure_first_request, report, first_n)
    trio.run(measure_verification, report, 2000 if args.quick else 20000, nodes, lookups)
    report.write()


if __name__ == "__main__":
    main()
