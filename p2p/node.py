"""The Node: a host, the DHT, sessions and reasoning, composed.

A node publishes a signed capability record under its node key in the DHT and registers as
a provider under one DHT key per capability tag, republishing before either expires. To ask,
it looks providers up, verifies each one's signed record, negotiates a session (a grant
bound to its own peer id), and routes the request to the provider it expects to answer
first (:mod:`.routing`), failing over to the next one if a provider errs before its first
chunk and hedging with the next one if a provider is slower than usual (:class:`_Race`). A
node with ``Config.forwarding`` routes requests for others (:mod:`.forwarding`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import time
from typing import Any, Awaitable, Callable, Collection, Mapping, NamedTuple, Sequence

import trio

from modelnet.errors import unwrapping_groups
from modelnet.identity import IdentityError, Membership, PeerID, PrivateKey, Revocation
from modelnet.models.base import Backend
from modelnet.protocols import access
from modelnet.protocols import capability as cap
from modelnet.protocols import forward, private, reason, session
from modelnet.protocols.errors import ProtocolError, RemoteProtocolError

from .config import Config
from .errors import P2PError
from .exchange import next_event, open_stream
from .host import Host, full_address, split_full_address
from .kad.dht import KademliaDHT
from .kad.errors import RequestFailed as DHTRequestFailed
from .relay import RelayClient, RelayService
from .forwarding import Forwarder
from .routing import ProviderStats, pooled_p95, rank_providers
from .serving import ModelServer
from .trust import Revocations, credentials_for

__all__ = ["Answer", "Attempt", "Config", "NoProvider", "Node", "NodeError", "Provider", "RequestFailed"]

logger = logging.getLogger(__name__)

DEFAULT_HOP_LIMIT = 8
UNDER_REPLICATED_REPUBLISH = 2.0  # seconds before publishing again while records reach < k peers


class NodeError(P2PError):
    """Base of errors a node raises to its user."""


class NoProvider(NodeError):
    """No reachable, verified provider serves the capability."""


class _PeerMessage(NamedTuple):
    peer: PeerID
    message: str


class Attempt(_PeerMessage):
    """One failed attempt at a request: a ``(peer, message)`` pair, as callers unpack it,
    that also carries the error ``code`` (``reason.OVERLOADED``, a session refusal code,
    ``reason.DEADLINE_EXCEEDED`` …; None when the attempt failed without a code: the
    stream broke, the answer did not verify), so a caller decides on the code, never on
    the wording of the message."""

    code: str | None = None

    def __new__(cls, peer: PeerID, message: str, code: str | None = None) -> "Attempt":
        attempt = super().__new__(cls, peer, message)
        attempt.code = code
        return attempt

    def __repr__(self) -> str:
        return f"Attempt(peer={self.peer!r}, message={self.message!r}, code={self.code!r})"


class RequestFailed(NodeError):
    """Every provider tried failed; ``errors`` says how each one failed (:class:`Attempt`).

    ``code`` is the provider's error code (``reason.INVALID_INPUT`` …) when one decided it.
    """

    def __init__(
        self, message: str, errors: Sequence[Attempt] = (), code: str | None = None, partial: Sequence[str] = ()
    ) -> None:
        super().__init__(message)
        self.errors: list[Attempt] = [e if isinstance(e, Attempt) else Attempt(*e) for e in errors]
        self.code = code
        self.partial = tuple(partial)  # chunks the caller already received when the provider failed


@dataclasses.dataclass(frozen=True)
class Provider:
    """A provider found through the DHT, with its verified capability record.

    ``org`` is the organisation under whose private records it was found (None: found
    publicly); the session offer then carries our certificate of that organisation.
    """

    peer_id: PeerID
    record: cap.CapabilityRecord
    models: tuple[cap.ModelCapability, ...]
    org: PeerID | None = None

    @property
    def addrs(self) -> tuple[str, ...]:
        return self.record.addrs


@dataclasses.dataclass(frozen=True)
class Answer:
    """The outcome of one routed request."""

    capability: str
    provider: PeerID
    model: str
    output: Any
    chunks: tuple[str, ...]
    usage: reason.Usage
    receipt: bytes
    elapsed: float  # seconds from ask to result, as the asker measured it
    attempts: tuple[Attempt, ...]  # providers that failed before this one, and why
    route: tuple[PeerID, ...] = ()  # forwarders between us and the provider, in order
    forwards: tuple[bytes, ...] = ()  # their signed forward statements (protocols.forward)
    request_id: bytes = b""  # what the receipt and the statements commit to

    def verify(self, asker: PeerID) -> reason.Receipt:
        """Check the provenance again, offline: the receipt (and any forwarders' statements)
        for this answer (output and streamed chunks) asked by ``asker``. Raises identity or
        protocol errors."""
        provider, client = self.provider, asker
        if self.forwards:
            route, provider = forward.check_route(
                self.forwards, request_id=self.request_id, asker=asker, first_hop=self.route[0], receipt=self.receipt
            )
            client = route[-1]
        receipt = reason.open_receipt(self.receipt, provider=provider)
        if (receipt.request_id, receipt.client, receipt.model, receipt.output_sha256, receipt.chunks_sha256) != (
            self.request_id,
            client,
            self.model,
            reason.output_digest(self.output),
            reason.chunks_digest(self.chunks),
        ):
            raise RemoteProtocolError("the receipt does not match this answer")
        return receipt


class Node:
    def __init__(
        self,
        host: Host,
        key: PrivateKey,
        backends: Sequence[Backend] = (),
        config: Config = Config(),
        *,
        wall_clock: Callable[[], float] = time.time,
        memberships: Sequence[Membership] = (),
        policies: Mapping[str, access.AccessPolicy] = {},
        revocations: Sequence[Revocation] = (),
    ) -> None:
        if host.peer_id != key.peer_id:
            raise NodeError("the host runs under another key than the node")
        self.host = host
        self.key = key
        self.config = config
        self.wall_clock = wall_clock
        self.backends = list(backends)
        # trust (issue 3): organisations we belong to (certificates we present, records keys
        # for private records), the policy of each served model (absent: public), and the
        # revocation lists of the organisations those policies name.
        self.memberships = list(memberships)
        self.policies = {name: policy for name, policy in policies.items() if not policy.public}
        self.revocations = Revocations(revocations)
        self.server = ModelServer(key, self.backends, config, wall_clock, policies=self.policies, revocations=self.revocations)
        self.forwarder: Forwarder | None = None
        if config.forwarding and not config.client_mode:
            self.forwarder = self.server.forwarder = Forwarder(self)
        dht_config = dataclasses.replace(config.dht, client_mode=config.client_mode)
        self.dht = KademliaDHT(
            host,
            dht_config,
            wall_clock=wall_clock,
            validators={
                cap.NODE_KEY_PREFIX: cap.NodeRecordValidator(),
                access.RevocationValidator.prefix: access.RevocationValidator(),
                private.PRIVATE_NODE_KEY_PREFIX: private.PrivateRecordValidator(),
            },
        )
        # circuit relay: a relay for others, and our reservations (our addresses then
        # include circuits through those relays, so the records we publish carry them)
        self.relay_service = RelayService(host, config.relay_limits, wall_clock=wall_clock) if config.relay_service else None
        self.relay_client = RelayClient(host, config.relays, wall_clock=wall_clock) if config.relays else None
        self.stats: dict[PeerID, ProviderStats] = {}
        self._grants: dict[tuple[PeerID, str], session.Grant] = {}
        self._records: dict[tuple[PeerID, PeerID | None], tuple[float, cap.CapabilityRecord]] = {}  # (peer, org)
        self._providers: dict[tuple[str, bool], tuple[float, list[Provider]]] = {}  # (tag, anonymous)
        # Grants we negotiated presenting no certificate, for requests we forward: a grant
        # won with our memberships never serves a stranger's request.
        self._anonymous_grants: dict[tuple[PeerID, str], session.Grant] = {}
        self._org_of: dict[PeerID, PeerID] = {}  # the organisation a provider was found under privately
        self._seq = 0
        self._nursery: trio.Nursery | None = None  # the serving nursery, for latency probes
        self._probing: set[PeerID] = set()
        self._published = trio.Event()
        self._warm = trio.Event()

    # -- identity and what we serve ---------------------------------------------------

    @property
    def peer_id(self) -> PeerID:
        return self.key.peer_id

    @property
    def addrs(self) -> list[str]:
        """Full addresses (with /p2p/) others can bootstrap from."""
        return [full_address(a, self.peer_id) for a in self.host.listen_addrs()]

    def capability_record(self) -> cap.CapabilityRecord:
        """The public record: the models with no access policy (a private model is never
        advertised under public keys)."""
        models = tuple(served.capability for name, served in self.server.models.items() if name not in self.policies)
        return cap.CapabilityRecord(peer_id=self.peer_id, addrs=tuple(self.host.listen_addrs()), models=models)

    def private_records(self) -> list[tuple[Membership, cap.CapabilityRecord]]:
        """For each organisation we hold a valid membership of, the record of the models
        whose policy names it. Models whose policy names only organisations we are no
        member of, or only peers, are advertised nowhere."""
        now = self.wall_clock()
        out: list[tuple[Membership, cap.CapabilityRecord]] = []
        seen: set[PeerID] = set()
        for membership in self._valid_memberships(now):
            if membership.org in seen:
                continue
            seen.add(membership.org)
            models = tuple(
                served.capability
                for name, served in self.server.models.items()
                if name in self.policies and membership.org in self.policies[name].orgs
            )
            if models:
                out.append((membership, cap.CapabilityRecord(peer_id=self.peer_id, addrs=tuple(self.host.listen_addrs()), models=models)))
        return out

    def _valid_memberships(self, now: float) -> list[Membership]:
        return [m for m in self.memberships if now < m.certificate.expires]

    # -- lifecycle ----------------------------------------------------------------------

    async def serve(self, bootstrap: Sequence[str] = (), *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run the node until cancelled: DHT, handlers, join, publish, republish.

        Started (``nursery.start``) once the node has joined through ``bootstrap`` (full
        addresses); a join that fails raises from ``start``. Publishing begins after the
        join, so the first records go to peers that can keep them.
        """
        join_error: P2PError | None = None
        serving = bool(self.server.models) and not self.config.client_mode
        answering = serving or self.forwarder is not None
        async with trio.open_nursery() as nursery:
            await nursery.start(self.dht.serve)
            if self.relay_service is not None:
                await nursery.start(self.relay_service.serve)
            if self.relay_client is not None:
                await nursery.start(self.relay_client.serve)
            if answering:
                self.host.set_stream_handler(session.SESSION_PROTOCOL, self.server.handle_session)
                self.host.set_stream_handler(reason.REASON_PROTOCOL, self.server.handle_reason)
            try:
                if bootstrap:
                    try:
                        await self.bootstrap(bootstrap)
                    except P2PError as exc:
                        # Raised after the nursery, so the caller sees the error itself
                        # and not an exception group.
                        join_error = exc
                        nursery.cancel_scope.cancel()
                if join_error is None:
                    self._nursery = nursery
                    task_status.started()
                    nursery.start_soon(self._warm_backends)
                    if serving:
                        nursery.start_soon(self._republish_loop)
                    # providers honour revocations of the organisations their policies
                    # name; members, of their own (to distrust revoked private providers)
                    orgs = {org for policy in self.policies.values() for org in policy.orgs} if serving else set()
                    orgs = sorted(orgs | {m.org for m in self.memberships})
                    if orgs:
                        await nursery.start(
                            functools.partial(
                                self.revocations.serve_refresh,
                                self.dht,
                                orgs,
                                interval=self.config.revocation_refresh or self.config.republish_interval,
                                wall_clock=self.wall_clock,
                            )
                        )
                    await trio.sleep_forever()
            finally:
                self._nursery = None
                if answering:
                    self.host.remove_stream_handler(session.SESSION_PROTOCOL)
                    self.host.remove_stream_handler(reason.REASON_PROTOCOL)
        if join_error is not None:
            raise join_error

    async def bootstrap(self, addresses: Sequence[str]) -> int:
        """Join through full addresses (``…/p2p/<id>``); returns the routing-table size."""
        peers = [split_full_address(a) for a in addresses]
        return await self.dht.bootstrap([(peer, [addr]) for addr, peer in peers])

    async def publish(self) -> int:
        """Sign and store our capability records; register as provider for each tag.

        Public models go under the public keys; each organisation's private models under
        that organisation's private keys only, sealed (:mod:`modelnet.protocols.private`).
        Returns the fewest peers any of those records reached (the replication achieved).
        """
        record = self.capability_record()
        now = self.wall_clock()
        # A sequence number that grows across restarts without state on disk.
        self._seq = max(self._seq + 1, int(now * 1000))
        expires = now + self.config.record_ttl
        # (DHT key, value) to store and provider keys to announce
        values: list[tuple[bytes, bytes]] = []
        provider_keys: list[bytes] = []
        if record.models or not self.policies:
            values.append((cap.node_record_key(self.peer_id), record.sign(self.key, seq=self._seq, expires=expires).encode()))
            provider_keys.extend(cap.capability_key(tag) for tag in sorted(record.capability_tags()))
        for membership, private_record in self.private_records():
            dht_key, sealed = private.seal_record(
                self.key,
                private_record,
                records_key=membership.records_key,
                certificate=membership.certificate,  # members trust it only with this inside
                seq=self._seq,
                expires=min(expires, membership.certificate.expires),
                nonce=os.urandom(private.NONCE_BYTES),
            )
            values.append((dht_key, sealed.encode()))
            provider_keys.extend(
                private.private_capability_key(membership.records_key, tag) for tag in sorted(private_record.capability_tags())
            )
        reached: list[int] = []

        async def store(work, key: bytes, *args) -> None:
            reached.append(await work(key, *args))

        with unwrapping_groups():
            async with trio.open_nursery() as nursery:
                for key, value in values:
                    nursery.start_soon(store, self.dht.put_value, key, value)
                for key in provider_keys:
                    nursery.start_soon(store, self.dht.provide, key)
        replicas = min(reached, default=0)
        logger.info(
            "published %d capability records and %d provider keys for %s (replicas: %d)",
            len(values), len(provider_keys), self.peer_id, replicas,
        )  # fmt: skip
        self._published.set()
        return replicas

    async def wait_published(self) -> None:
        await self._published.wait()

    async def wait_warm(self) -> None:
        """Until every backend has loaded its models (or failed to, which is logged)."""
        await self._warm.wait()

    async def _warm_backends(self) -> None:
        for backend in self.backends:
            try:
                await backend.warm()
            except Exception:  # top of a task: a model that fails to load fails its requests, not the node
                logger.exception("warming backend %s failed", backend.name)
        self._warm.set()

    async def _republish_loop(self) -> None:
        # While the records reach fewer than k peers (a young or small network), publish
        # again soon, backing off, so nodes that join later hold them too; then settle to
        # the regular interval.
        delay = UNDER_REPLICATED_REPUBLISH
        while True:
            replicas = 0
            try:
                replicas = await self.publish()
            except Exception:  # top of a task: log, keep the node up, retry later
                logger.exception("publishing the capability record failed")
            # A network smaller than k can never give k replicas: everyone is enough.
            if replicas >= min(self.config.dht.k, len(self.dht.routing_table)):
                await trio.sleep(self.config.republish_interval)
            else:
                await trio.sleep(delay)
                delay = min(delay * 2, self.config.republish_interval)

    # -- discovery ----------------------------------------------------------------------

    async def find(self, capability: str, *, fresh: bool = False, anonymous: bool = False) -> list[Provider]:
        """Providers of ``capability`` whose signed records verify, in routing order.

        Looks up the public key of the tag and, for every organisation we are a member
        of, its private key, all at once; privately found providers carry their ``org``
        and count only with a valid certificate of it that our revocation lists (looked up
        first if older than one refresh interval) do not revoke.
        ``anonymous`` (for a request we forward) looks up the public key only. A provider
        found several ways is one provider (its models merged). A recent answer is reused
        for ``Config.provider_cache_ttl`` unless ``fresh``.
        """
        tag = cap.normalize_tag(capability)
        cached = self._providers.get((tag, anonymous))
        now = trio.current_time()
        # a provider revoked since the list was cached is looked up again, not reused
        if cached and not fresh and cached[0] > now and not any(self._revoked(p.peer_id, p.org) for p in cached[1]):
            return rank_providers(cached[1], self.stats, key=lambda p: p.peer_id, now=now)
        memberships = [] if anonymous else self._valid_memberships(self.wall_clock())
        searches: list[tuple[Membership | None, bytes]] = [(None, cap.capability_key(tag))]
        searches += [(m, private.private_capability_key(m.records_key, tag)) for m in memberships]
        found: dict[PeerID, Provider] = {}
        revocations_known = trio.Event()  # private records are judged against fresh lists

        async def refresh_revocations() -> None:
            try:
                interval = self.config.revocation_refresh or self.config.republish_interval
                stale = self.revocations.stale((m.org for m in memberships), interval)
                if stale:
                    await self.revocations.refresh(self.dht, stale, now=self.wall_clock())
            finally:
                revocations_known.set()

        async def fetch(peer: PeerID, addrs: list[str], membership: Membership | None) -> None:
            if addrs:
                self.host.add_addrs(peer, addrs)
            if membership is not None:
                await revocations_known.wait()
            record = await self._record_of(peer, membership)
            if record is None:
                return
            models = record.models_for(tag)
            if not models:
                logger.info("%s registered for %s but its record does not offer it", peer.short(), tag)
                return
            provider = Provider(peer, record, models, membership.org if membership else None)
            known = found.get(peer)
            if known is not None:  # found publicly and privately, or through two organisations
                names = {m.name for m in known.models}
                provider = dataclasses.replace(
                    known, models=known.models + tuple(m for m in models if m.name not in names), org=known.org or provider.org
                )
            found[peer] = provider
            if provider.org is not None:
                self._org_of[peer] = provider.org

        async def search(membership: Membership | None, key: bytes) -> None:
            peers = await self.dht.find_providers(key, count=self.config.max_providers)
            async with trio.open_nursery() as nursery:
                for peer, addrs in peers:
                    if peer != self.peer_id:
                        nursery.start_soon(fetch, peer, addrs, membership)

        with unwrapping_groups():
            async with trio.open_nursery() as nursery:
                if memberships:
                    nursery.start_soon(refresh_revocations)
                for membership, key in searches:
                    nursery.start_soon(search, membership, key)
        providers = list(found.values())
        if providers:
            self._providers[(tag, anonymous)] = (trio.current_time() + self.config.provider_cache_ttl, providers)
        return rank_providers(providers, self.stats, key=lambda p: p.peer_id, now=trio.current_time())

    def _revoked(self, peer: PeerID, org: PeerID | None) -> bool:
        return org is not None and self.revocations.is_revoked(org, peer)

    async def _record_of(self, peer: PeerID, membership: Membership | None = None) -> cap.CapabilityRecord | None:
        """``peer``'s verified record: the public one, or the one it sealed for the
        organisation of ``membership`` (which must carry its valid, unrevoked certificate of
        that organisation). None (logged) if it cannot be had or does not verify."""
        now = self.wall_clock()
        org = membership.org if membership is not None else None
        cached = self._records.get((peer, org))
        if cached and cached[0] > now and not self._revoked(peer, org):
            return cached[1]
        key = cap.node_record_key(peer) if membership is None else private.private_node_key(membership.records_key, peer)
        try:
            with trio.fail_after(self.config.network_timeout):
                # The provider holds its own record: one round trip to it, and the DHT
                # lookup only if the provider cannot be asked.
                try:
                    value = await self.dht.get_value_from(peer, key)
                except DHTRequestFailed as exc:
                    logger.info("asking %s for its record failed (%s); looking it up", peer.short(), exc)
                    value = await self.dht.get_value(key)
        except trio.TooSlowError:
            logger.info("record of %s not found in time", peer.short())
            return None
        if value is None:
            return None
        try:
            if membership is None:
                signed, record = cap.open_capability_record(value, now=now, peer=peer)
                valid_until = signed.expires
            else:
                signed, record, certificate = private.open_private_record(
                    value, records_key=membership.records_key, org=membership.org, now=now, peer=peer,
                    is_revoked=self.revocations.is_revoked,
                )  # fmt: skip
                valid_until = min(signed.expires, certificate.expires)
        except (IdentityError, ProtocolError) as exc:
            where = f" for {membership.org_name} ({org.short()})" if org is not None else ""
            logger.warning("dropping record of %s%s: %s", peer.short(), where, exc)
            self._records.pop((peer, org), None)
            if org is not None and self._org_of.get(peer) == org:
                del self._org_of[peer]  # no longer vouched for by that organisation
            return None
        self._records[(peer, org)] = (valid_until, record)
        if record.addrs:
            self.host.add_addrs(peer, list(record.addrs))
        return record

    # -- asking -------------------------------------------------------------------------

    async def ask(
        self,
        capability: str,
        text: str,
        params: Mapping[str, Any] | None = None,
        *,
        model: str | None = None,
        timeout: float | None = None,
        on_chunk: Callable[[PeerID, str], None] | None = None,
        via: Sequence[str] = (),
        hop_limit: int | None = None,
        exclude: Collection[PeerID] = (),
        anonymous: bool = False,
    ) -> Answer:
        """Route one request; raise NoProvider or RequestFailed.

        Providers are tried in routing order (:func:`~.routing.rank_providers`). One that
        fails before its first chunk is replaced by the next; one that sends no first
        chunk within its measured p95 gets company: the next provider is asked too, the
        first to answer wins and the other is cancelled (``Config.hedging``). If every
        provider from a cached lookup failed, the lookup is redone once; if that finds
        none, the request goes to ``Config.upstream`` forwarders. At most
        ``Config.max_attempts`` providers are tried in all.

        A provider that fails after its first chunk is replaced too when nothing has
        reached the caller yet (no ``on_chunk``: its partial answer is dropped and the
        request replayed); with ``on_chunk`` the caller has seen text another model would
        not repeat, so the request fails (``RequestFailed.partial`` holds that text).

        ``via`` (full addresses) sends the request only through those peers, which route
        it onward (a light client without a DHT). Everything, discovery included, happens
        within ``timeout`` (default ``Config.request_timeout``). Providers in ``exclude`` are
        never asked (a plan's ensemble sends one step to distinct providers).

        ``anonymous`` asks without this node's organisation authority, as a forwarder asks
        for others: public records only, no certificate presented, grants kept apart (the
        gateway asks so for its HTTP clients unless told to lend them the node's access).
        """
        tag = cap.normalize_tag(capability)
        budget = timeout if timeout is not None else self.config.request_timeout
        targets: tuple[PeerID, ...] = ()
        for addr, peer in (split_full_address(a) for a in via):
            self.host.add_addrs(peer, [addr])
            targets += (peer,)
        sink = None
        if on_chunk is not None:

            async def sink(peer: PeerID, text: str) -> None:
                on_chunk(peer, text)

        ask = _Ask(
            capability=tag,
            text=text,
            params=dict(params or {}),
            model=model,
            deadline=trio.current_time() + budget,
            sink=sink,
            request_id=os.urandom(reason.REQUEST_ID_BYTES),
            hop_limit=self.config.hop_limit if hop_limit is None else hop_limit,
            visited=(),
            via=targets,
            excluded=frozenset(exclude),
            on_behalf_of=self.peer_id if anonymous else None,  # nobody we can name
        )
        return await self.route(ask)

    async def route(self, ask: _Ask) -> Answer:
        """The router under :meth:`ask` and the forwarder: race attempts until one answers."""
        started = trio.current_time()
        race = _Race(self, ask)
        with trio.move_on_at(ask.deadline):
            async with trio.open_nursery() as nursery:
                await race.run(nursery)
                nursery.cancel_scope.cancel()  # losers, if any are still running
        if race.answer is not None:
            return dataclasses.replace(race.answer, elapsed=trio.current_time() - started, attempts=tuple(race.failures))
        failures = race.failures
        if race.fatal is not None:
            raise race.fatal
        if not race.tried:
            if trio.current_time() >= ask.deadline:
                raise RequestFailed(f"{ask.capability}: the deadline passed before any provider was found")
            what = f"no provider of {ask.capability!r}" + (f" with model {ask.model!r}" if ask.model else "")
            raise NoProvider(what + " found")
        if trio.current_time() >= ask.deadline:
            failures.append(Attempt(self.peer_id, f"deadline of {ask.deadline - started:g} s passed", reason.DEADLINE_EXCEEDED))
        if not failures:
            raise RequestFailed(f"{ask.capability}: no provider answered")
        summary = failures[0][1] if len(failures) == 1 else f"all {len(failures)} attempts failed"
        raise RequestFailed(f"{ask.capability}: {summary}", failures, race.last_code)

    async def _targets(self, ask: _Ask, stage: int) -> list[PeerID] | None:
        """Who to try, in routing order, at ``stage``; None when the stages are exhausted.

        0: the cached lookup (or ``ask.via``), 1: a fresh lookup, 2: upstream forwarders.
        Peers the request already visited are never candidates: loops are impossible. A
        request we forward is looked up publicly only and goes to at most one upstream
        forwarder, so a mesh of forwarders walks one path instead of every path.
        """
        excluded = set(ask.visited) | {self.peer_id} | ask.excluded
        anonymous = ask.on_behalf_of is not None
        now = trio.current_time()
        if ask.via:
            peers = [peer for peer in ask.via if peer not in excluded] if stage == 0 else None
        elif stage < 2:
            found = await self.find(ask.capability, fresh=stage == 1, anonymous=anonymous)
            providers = [p for p in found if p.peer_id not in excluded]
            if ask.model is not None:
                providers = [p for p in providers if any(m.name == ask.model for m in p.models)]
            await self._measure_unknown(providers, ask.capability, anonymous=anonymous)
            peers = [p.peer_id for p in providers]
        elif stage == 2:
            peers = []
            for addr, peer in (split_full_address(a) for a in self.config.upstream):
                if peer not in excluded:
                    self.host.add_addrs(peer, [addr])
                    peers.append(peer)
            if anonymous:
                return rank_providers(peers, self.stats, key=lambda p: p, now=now)[:1]
        else:
            peers = None
        return None if peers is None else rank_providers(peers, self.stats, key=lambda p: p, now=now)

    async def _measure_unknown(self, providers: Sequence[Provider], capability: str, *, anonymous: bool = False) -> None:
        """Negotiate sessions with providers we have no latency for, concurrently.

        The session round trip is the latency sample that ranks them, so a fresh node does
        not send its first request to an arbitrary provider. We wait for the first answer
        only; the slower probes finish in the node's own nursery and rank their providers
        for later requests, so a dead provider never holds a request up.
        """
        unknown = [
            p
            for p in providers
            if p.peer_id not in self._probing and (p.peer_id not in self.stats or self.stats[p.peer_id].latency is None)
        ][: self.config.dht.alpha + 2]
        if not unknown:
            return
        answered = trio.Event()
        pending = len(unknown)

        async def probe(provider: Provider) -> None:
            nonlocal pending
            self._probing.add(provider.peer_id)
            try:
                await self._grant_for(provider.peer_id, capability, org=provider.org, anonymous=anonymous)
                answered.set()
            except _ProviderFailed as exc:
                logger.info("session with %s failed: %s", provider.peer_id.short(), exc)
            finally:
                self._probing.discard(provider.peer_id)
                pending -= 1
                if not pending:
                    answered.set()

        if self._nursery is None:  # not serving: nowhere to leave probes running
            async with trio.open_nursery() as nursery:
                for provider in unknown:
                    nursery.start_soon(probe, provider)
            return
        for provider in unknown:
            self._nursery.start_soon(probe, provider)
        await answered.wait()

    def _stats_for(self, peer: PeerID) -> ProviderStats:
        stats = self.stats.get(peer)
        if stats is None:
            stats = self.stats[peer] = ProviderStats()
        return stats

    async def _grant_for(
        self, peer: PeerID, capability: str, *, org: PeerID | None = None, anonymous: bool = False
    ) -> session.Grant:
        """A session grant for ``capability`` from ``peer``: cached, or negotiated now.

        The offer carries our certificate for ``org`` (the organisation under which the
        provider was found privately) or, when that is unknown, all our valid ones;
        ``anonymous`` (for a request we forward) presents none, and caches the grant apart.
        """
        now = self.wall_clock()
        grants = self._anonymous_grants if anonymous else self._grants
        grant = grants.get((peer, capability))
        # Keep a margin so a grant does not expire between our check and the provider's.
        if grant is not None and grant.expires > now + 5:
            return grant
        started = trio.current_time()
        client = session.ClientSession(self.key, provider=peer, now=now)
        stats = self._stats_for(peer)
        try:
            with trio.fail_after(self.config.network_timeout):
                async with open_stream(self.host, peer, session.SESSION_PROTOCOL) as stream:
                    credentials = () if anonymous else credentials_for(self.memberships, None if org is None else (org,), now=now)
                    await stream.write(client.send_offer(capability, credentials, nonce=os.urandom(session.NONCE_BYTES)))
                    event = await next_event(stream, client)
        except trio.TooSlowError:
            stats.record_failure(trio.current_time())
            raise _ProviderFailed("session negotiation timed out") from None
        except (P2PError, ProtocolError, IdentityError) as exc:
            stats.record_failure(trio.current_time())
            raise _ProviderFailed(f"session negotiation failed: {exc}") from None
        if isinstance(event, session.Refusal):
            raise _ProviderFailed(f"refused: {event.code}: {event.reason}", code=event.code)
        stats.record_rtt(trio.current_time() - started, load=_load(event))
        grants[(peer, capability)] = event
        return event

    async def _attempt(self, peer: PeerID, ask: _Ask, attempt: _Attempt) -> Answer:
        # A request we forward runs on no authority of ours: no certificate, own grants.
        anonymous = ask.on_behalf_of is not None
        cached = (peer, ask.capability) in (self._anonymous_grants if anonymous else self._grants)
        org = None if anonymous else self._org_of.get(peer)  # the organisation we found it under privately
        grant = await self._grant_for(peer, ask.capability, org=org, anonymous=anonymous)
        try:
            return await self._request(peer, grant, ask, attempt)
        except _GrantRejected:
            if not cached:
                raise
            # A grant we had cached was refused (it expired early, the provider restarted):
            # one new session, then the request once more.
            grant = await self._grant_for(peer, ask.capability, org=org, anonymous=anonymous)
            return await self._request(peer, grant, ask, attempt)

    async def _request(self, peer: PeerID, grant: session.Grant, ask: _Ask, attempt: _Attempt) -> Answer:
        capability, deadline = ask.capability, ask.deadline
        request = reason.Request(
            request_id=ask.request_id,
            capability=capability,
            input=ask.text,
            params=dict(ask.params),
            budget=min(max(deadline - trio.current_time(), 0.0), reason.MAX_BUDGET),
            hop_limit=ask.hop_limit,
            visited=ask.visited + (self.peer_id,),
            grant=grant.encode(),
            model=ask.model,
        )
        # checks the receipt against request, output and us, through any forwarders
        client = reason.ReasonClient(provider=peer, client=self.peer_id)
        chunks: list[str] = []
        received = 0
        stats = self._stats_for(peer)
        try:
            with trio.fail_at(deadline):
                async with open_stream(self.host, peer, reason.REASON_PROTOCOL) as stream:
                    await stream.write(client.send_request(request))
                    attempt.sent = trio.current_time()
                    while True:
                        event = await next_event(stream, client)
                        if isinstance(event, reason.Error):
                            break
                        if not attempt.won:
                            stats.record_first_chunk(trio.current_time() - attempt.sent)
                            if not attempt.race.claim(attempt):
                                await trio.lowlevel.checkpoint()  # lost by a hair: our scope is cancelled
                        if not isinstance(event, reason.Chunk):
                            break
                        received += len(event.text)
                        if received > self.config.max_answer_bytes:
                            raise _ProviderFailed(f"answer exceeds {self.config.max_answer_bytes} bytes", after_first_chunk=True)
                        chunks.append(event.text)
                        if ask.sink is not None:
                            attempt.chunks.append(event.text)
                            attempt.delivered = True
                            await ask.sink(peer, event.text)
        except trio.TooSlowError:
            stats.record_failure(trio.current_time())
            raise _ProviderFailed("deadline exceeded", after_first_chunk=attempt.won, code=reason.DEADLINE_EXCEEDED) from None
        except (P2PError, ProtocolError, IdentityError) as exc:
            stats.record_failure(trio.current_time())
            raise _ProviderFailed(str(exc) or type(exc).__name__, after_first_chunk=attempt.won) from None
        if isinstance(event, reason.Error):
            if event.code == reason.UNAUTHORIZED:
                (self._anonymous_grants if ask.on_behalf_of is not None else self._grants).pop((peer, capability), None)
                raise _GrantRejected(f"{event.code}: {event.message}", code=event.code)
            if event.code == reason.OVERLOADED:
                stats.record_overload()  # busy is not broken: no ban
            elif event.code != reason.INVALID_INPUT:  # refusing bad input is the provider doing its job
                stats.record_failure(trio.current_time())
            raise _ProviderFailed(
                f"{event.code}: {event.message}", after_first_chunk=attempt.won, code=event.code, final=not event.retryable
            )
        stats.record_load(event.queue, event.capacity)
        stats.record_success()
        return Answer(
            capability=capability,
            provider=client.answered_by or peer,
            model=event.model,
            output=event.output,
            chunks=tuple(chunks),
            usage=event.usage,
            receipt=event.receipt,
            elapsed=0.0,
            attempts=(),
            route=client.route,
            forwards=event.via,
            request_id=ask.request_id,
        )


@dataclasses.dataclass(frozen=True)
class _Ask:
    """One request as the router carries it from provider to provider."""

    capability: str  # normalised tag
    text: str
    params: Mapping[str, Any]
    model: str | None
    deadline: float  # on trio's clock
    sink: Callable[[PeerID, str], Awaitable[None]] | None  # the winning attempt's chunks, as they come
    request_id: bytes
    hop_limit: int  # hops the request may take from here
    visited: tuple[PeerID, ...]  # peers it passed through before us
    via: tuple[PeerID, ...] = ()  # only these peers, which forward it
    excluded: frozenset[PeerID] = frozenset()  # never ask these (the caller's choice)
    # The peer we forward it for; then it is routed anonymously: public lookups only, no
    # certificate presented, grants of its own (our memberships are not the asker's).
    on_behalf_of: PeerID | None = None


@dataclasses.dataclass(eq=False)
class _Attempt:
    peer: PeerID
    race: "_Race"
    scope: trio.CancelScope
    started: float  # when the attempt began (session included): hedging counts from here
    sent: float | None = None  # when the request went out
    won: bool = False  # its first chunk came first: its answer is the one
    lost: bool = False  # another attempt won: cancelled
    delivered: bool = False  # some of its chunks reached the caller
    done: bool = False
    chunks: list[str] = dataclasses.field(default_factory=list)  # those chunks


class _Race:
    """Attempts at one request: failover, hedging, and the first answer wins.

    One attempt runs at first. Another starts when every running one has failed before
    its first chunk (failover), or when the newest has sent no first chunk within its
    provider's hedge delay (hedging, up to ``Config.max_parallel_attempts`` at once), and
    never more than ``Config.max_attempts`` in all. The first attempt to get a first chunk
    claims the race and every other is cancelled, which resets its stream so its provider
    stops working. A winner that fails after its first chunk is replaced only if none of
    its chunks reached the caller. Bad input, and a non-retryable no-such-capability or
    hop-limit (a forwarder searched already, or no hop is left), end the race.
    """

    def __init__(self, node: Node, ask: _Ask) -> None:
        self.node = node
        self.ask = ask
        self.attempts: list[_Attempt] = []
        self.tried: set[PeerID] = set()
        self.failures: list[Attempt] = []
        self.answer: Answer | None = None
        self.fatal: RequestFailed | None = None
        self.last_code: str | None = None  # of the latest failure: what the caller is told
        self.changed = trio.Event()
        self._queue: list[PeerID] = []
        self._stage = 0
        self._exhausted = False

    def claim(self, attempt: _Attempt) -> bool:
        if any(other.won for other in self.attempts if other is not attempt):
            attempt.lost = True
            attempt.scope.cancel()
            return False
        attempt.won = True
        for other in self.attempts:
            if other is not attempt and not other.done:
                other.lost = True
                other.scope.cancel()
        return True

    async def _next_peer(self) -> PeerID | None:
        while not self._exhausted:
            while self._queue:
                peer = self._queue.pop(0)
                if peer not in self.tried:
                    return peer
            targets = await self.node._targets(self.ask, self._stage)
            self._stage += 1
            if targets is None:
                self._exhausted = True
            else:
                self._queue = targets
        return None

    async def _start_next(self, nursery: trio.Nursery) -> bool:
        if len(self.attempts) >= self.node.config.max_attempts:
            return False
        peer = await self._next_peer()
        if peer is None or self.answer is not None or self.fatal is not None:
            return False
        self.tried.add(peer)
        attempt = _Attempt(peer, self, trio.CancelScope(), trio.current_time())
        self.attempts.append(attempt)
        nursery.start_soon(self._run, attempt)
        return True

    async def _run(self, attempt: _Attempt) -> None:
        node, peer = self.node, attempt.peer
        try:
            with attempt.scope:
                try:
                    self.answer = await node._attempt(peer, self.ask, attempt)
                except _ProviderFailed as exc:
                    self._failed(attempt, exc)
            if attempt.lost and attempt.sent is not None and not attempt.won:
                # How long it has been silent is a lower bound of its time to first chunk:
                # a provider that keeps losing ranks down and is hedged sooner.
                node._stats_for(peer).record_first_chunk(trio.current_time() - attempt.sent)
                logger.info("hedged attempt on %s cancelled: another provider answered first", peer.short())
        finally:
            attempt.done = True
            self.changed.set()

    def _failed(self, attempt: _Attempt, exc: _ProviderFailed) -> None:
        peer = attempt.peer
        self.failures.append(Attempt(peer, str(exc), exc.code))
        self.last_code = exc.code
        if exc.code == reason.INVALID_INPUT or (exc.final and exc.code in _FINAL_CODES):
            # The input is at fault, not the provider (another would refuse it too), or
            # the peer routed it already and says another route is no use.
            self.fatal = RequestFailed(f"{self.ask.capability}: {exc}", self.failures, exc.code)
        elif attempt.won and (attempt.delivered or exc.code == reason.DEADLINE_EXCEEDED):
            partial = f"{peer.short()} failed mid-answer: {exc}"
            self.fatal = RequestFailed(partial, self.failures, exc.code, attempt.chunks)
        elif attempt.won:
            logger.info("provider %s failed mid-answer before anything reached the caller: replaying: %s", peer.short(), exc)
            attempt.won = False  # the race is open again
        else:
            logger.info("provider %s failed before its first chunk: %s", peer.short(), exc)

    async def run(self, nursery: trio.Nursery) -> None:
        config = self.node.config
        limit = max(1, config.max_parallel_attempts if config.hedging else 1)
        while self.answer is None and self.fatal is None:
            running = [a for a in self.attempts if not a.done]
            if not running:
                if not await self._start_next(nursery):
                    return
                continue
            self.changed = trio.Event()
            hedge_at = math.inf
            if (
                len(running) < limit
                and len(self.attempts) < config.max_attempts
                and not self._exhausted
                and not any(a.won for a in running)
            ):
                newest = running[-1]
                default = pooled_p95(self.node.stats.values()) or config.hedge_default
                delay = self.node._stats_for(newest.peer).hedge_delay(floor=config.hedge_floor, default=default)
                hedge_at = newest.started + delay
            with trio.move_on_at(hedge_at):
                await self.changed.wait()
            if trio.current_time() >= hedge_at and self.answer is None and not any(a.won for a in self.attempts if not a.done):
                logger.info("no first chunk from %s in %.3f s: hedging", running[-1].peer.short(), trio.current_time() - running[-1].started)
                await self._start_next(nursery)


# Codes that end a request when the peer sends them as not retryable: a forwarder that
# found no provider searched for us already, and a hop limit binds every route alike.
_FINAL_CODES = frozenset({reason.NO_SUCH_CAPABILITY, reason.HOP_LIMIT})


class _ProviderFailed(Exception):
    """Internal: one provider failed; the router decides whether to fail over.

    ``final``: the peer said retrying elsewhere is no use (``retryable`` false).
    """

    def __init__(self, message: str, *, after_first_chunk: bool = False, code: str | None = None, final: bool = False) -> None:
        super().__init__(message)
        self.after_first_chunk = after_first_chunk
        self.code = code
        self.final = final


class _GrantRejected(_ProviderFailed):
    """Internal: the provider refused a cached grant; a new session may succeed."""


def _load(grant: session.Grant) -> float:
    return grant.queue / grant.capacity if grant.capacity else 0.0
