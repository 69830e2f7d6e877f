"""The Node: a host, the DHT, sessions and reasoning, composed.

A node publishes a signed capability record under its node key in the DHT and registers as
a provider under one DHT key per capability tag, republishing before either expires. To ask,
it looks providers up, verifies each one's signed record, negotiates a session (a grant
bound to its own peer id), and routes the request to the provider with the lowest measured
latency, failing over to the next one if a provider errs before its first chunk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from typing import Any, AsyncIterator, Callable, Mapping, Sequence

import trio

from modelnet.identity import IdentityError, PeerID, PrivateKey
from modelnet.models.base import Backend, InvalidInput, ModelError, ModelInfo, UnknownModel
from modelnet.models.base import Chunk as ModelChunk
from modelnet.models.base import Output as ModelOutput
from modelnet.protocols import capability as cap
from modelnet.protocols import reason, session
from modelnet.protocols.errors import ProtocolError

from .errors import P2PError, StreamClosed
from .host import Host, Stream, full_address, split_full_address
from .kad.dht import Config as DHTConfig
from .kad.dht import KademliaDHT
from .kad.errors import RequestFailed as DHTRequestFailed
from .routing import ProviderStats, rank_providers

logger = logging.getLogger(__name__)

DEFAULT_HOP_LIMIT = 8
UNDER_REPLICATED_REPUBLISH = 2.0  # seconds before publishing again while records reach < k peers


class NodeError(P2PError):
    """Base of errors a node raises to its user."""


class NoProvider(NodeError):
    """No reachable, verified provider serves the capability."""


class RequestFailed(NodeError):
    """Every provider tried failed; ``errors`` says how each one failed.

    ``code`` is the provider's error code (``reason.INVALID_INPUT`` …) when one decided it.
    """

    def __init__(self, message: str, errors: Sequence[tuple[PeerID, str]] = (), code: str | None = None) -> None:
        super().__init__(message)
        self.errors = list(errors)
        self.code = code


@dataclasses.dataclass(frozen=True)
class Config:
    """Knobs of a node. Times are seconds."""

    record_ttl: float = 3600.0  # signed capability records expire after this
    republish_interval: float = 1200.0  # republish well before expiry (a third of the TTL)
    session_ttl: float = 600.0  # lifetime of a session grant we issue
    request_timeout: float = 30.0  # default deadline of a request we send
    network_timeout: float = 5.0  # bound of one network exchange (dial, session, record fetch)
    max_concurrent_requests: int = 32  # requests we serve at once; more are refused OVERLOADED
    max_providers: int = 20  # providers considered per lookup
    provider_cache_ttl: float = 30.0  # reuse a capability's provider list this long (DHT lookups are not free)
    client_mode: bool = False  # a light client: no DHT serving, nothing published
    dht: DHTConfig = DHTConfig()


@dataclasses.dataclass(frozen=True)
class Provider:
    """A provider found through the DHT, with its verified capability record."""

    peer_id: PeerID
    record: cap.CapabilityRecord
    models: tuple[cap.ModelCapability, ...]

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
    attempts: tuple[tuple[PeerID, str], ...]  # providers that failed before this one, and why


class Node:
    def __init__(
        self,
        host: Host,
        key: PrivateKey,
        backends: Sequence[Backend] = (),
        config: Config = Config(),
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if host.peer_id != key.peer_id:
            raise NodeError("the host runs under another key than the node")
        self.host = host
        self.key = key
        self.config = config
        self.wall_clock = wall_clock
        self.backends = list(backends)
        self._models: dict[str, tuple[ModelInfo, Backend]] = {}
        for backend in self.backends:
            for info in backend.models():
                self._models[info.name] = (info, backend)
        dht_config = dataclasses.replace(config.dht, client_mode=config.client_mode)
        self.dht = KademliaDHT(
            host,
            dht_config,
            wall_clock=wall_clock,
            validators={cap.NODE_KEY_PREFIX: cap.NodeRecordValidator()},
        )
        self.stats: dict[PeerID, ProviderStats] = {}
        self._grants: dict[tuple[PeerID, str], session.Grant] = {}
        self._records: dict[PeerID, tuple[float, cap.CapabilityRecord]] = {}
        self._providers: dict[str, tuple[float, list[Provider]]] = {}
        self._serving = 0
        self._seq = 0
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
        models = tuple(
            cap.ModelCapability(
                name=info.name,
                task=info.task,
                tags=tuple(info.tags),
                description=info.description,
                max_input_bytes=info.max_input_bytes,
                streaming=info.streaming,
            )
            for info, _ in self._models.values()
        )
        return cap.CapabilityRecord(peer_id=self.peer_id, addrs=tuple(self.host.listen_addrs()), models=models)

    # -- lifecycle ----------------------------------------------------------------------

    async def serve(self, bootstrap: Sequence[str] = (), *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run the node until cancelled: DHT, handlers, join, publish, republish.

        Started (``nursery.start``) once the node has joined through ``bootstrap`` (full
        addresses); a join that fails raises from ``start``. Publishing begins after the
        join, so the first records go to peers that can keep them.
        """
        join_error: P2PError | None = None
        async with trio.open_nursery() as nursery:
            await nursery.start(self.dht.serve)
            if not self.config.client_mode:
                self.host.set_stream_handler(session.SESSION_PROTOCOL, self._handle_session)
                self.host.set_stream_handler(reason.REASON_PROTOCOL, self._handle_reason)
            if bootstrap:
                try:
                    await self.bootstrap(bootstrap)
                except P2PError as exc:
                    # Raised outside the nursery, so the caller sees the error itself and
                    # not an exception group.
                    join_error = exc
                    nursery.cancel_scope.cancel()
            if join_error is None:
                task_status.started()
                nursery.start_soon(self._warm_backends)
            if self._models and not self.config.client_mode and join_error is None:
                nursery.start_soon(self._republish_loop)
        if join_error is not None:
            raise join_error

    async def bootstrap(self, addresses: Sequence[str]) -> int:
        """Join through full addresses (``…/p2p/<id>``); returns the routing-table size."""
        peers = [split_full_address(a) for a in addresses]
        return await self.dht.bootstrap([(peer, [addr]) for addr, peer in peers])

    async def publish(self) -> int:
        """Sign and store our capability record; register as provider for each tag.

        Returns the fewest peers any of those records reached (the replication achieved).
        """
        record = self.capability_record()
        now = self.wall_clock()
        # A sequence number that grows across restarts without state on disk.
        self._seq = max(self._seq + 1, int(now * 1000))
        signed = record.sign(self.key, seq=self._seq, expires=now + self.config.record_ttl)
        encoded = signed.encode()
        tags = sorted(record.capability_tags())
        reached: list[int] = []

        async def store(work, key: bytes, *args) -> None:
            reached.append(await work(key, *args))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(store, self.dht.put_value, cap.node_record_key(self.peer_id), encoded)
            for tag in tags:
                nursery.start_soon(store, self.dht.provide, cap.capability_key(tag))
        logger.info("published %d capability tags for %s (replicas: %d)", len(tags), self.peer_id, min(reached))
        self._published.set()
        return min(reached)

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
            if replicas >= self.config.dht.k:
                await trio.sleep(self.config.republish_interval)
            else:
                await trio.sleep(delay)
                delay = min(delay * 2, self.config.republish_interval)

    # -- discovery ----------------------------------------------------------------------

    async def find(self, capability: str, *, fresh: bool = False) -> list[Provider]:
        """Providers of ``capability`` whose signed records verify, in routing order.

        A recent answer is reused for ``Config.provider_cache_ttl`` unless ``fresh``.
        """
        tag = cap.normalize_tag(capability)
        cached = self._providers.get(tag)
        now = trio.current_time()
        if cached and not fresh and cached[0] > now:
            return rank_providers(cached[1], self.stats, key=lambda p: p.peer_id, now=now)
        found = await self.dht.find_providers(cap.capability_key(tag), count=self.config.max_providers)
        providers: list[Provider] = []

        async def fetch(peer: PeerID, addrs: list[str]) -> None:
            if addrs:
                self.host.add_addrs(peer, addrs)
            record = await self._record_of(peer)
            if record is None:
                return
            models = record.models_for(tag)
            if models:
                providers.append(Provider(peer, record, models))
            else:
                logger.info("%s registered for %s but its record does not offer it", peer.short(), tag)

        async with trio.open_nursery() as nursery:
            for peer, addrs in found:
                if peer != self.peer_id:
                    nursery.start_soon(fetch, peer, addrs)
        if providers:
            self._providers[tag] = (trio.current_time() + self.config.provider_cache_ttl, providers)
        return rank_providers(providers, self.stats, key=lambda p: p.peer_id, now=trio.current_time())

    async def _record_of(self, peer: PeerID) -> cap.CapabilityRecord | None:
        now = self.wall_clock()
        cached = self._records.get(peer)
        if cached and cached[0] > now:
            return cached[1]
        key = cap.node_record_key(peer)
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
            signed, record = cap.open_capability_record(value, now=now, peer=peer)
        except (IdentityError, ProtocolError) as exc:
            logger.warning("dropping record of %s: %s", peer.short(), exc)
            return None
        self._records[peer] = (signed.expires, record)
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
    ) -> Answer:
        """Route one request; raise NoProvider or RequestFailed.

        Providers are tried in routing order; one that fails before its first chunk is
        replaced by the next. If every provider from a cached lookup failed, the lookup is
        redone once and new providers are tried.
        """
        started = trio.current_time()
        deadline = self.wall_clock() + (timeout if timeout is not None else self.config.request_timeout)
        failures: list[tuple[PeerID, str]] = []
        tried: set[PeerID] = set()
        for fresh in (False, True):
            with trio.move_on_after(max(0.0, deadline - self.wall_clock())):
                found = await self.find(capability, fresh=fresh)
            if self.wall_clock() >= deadline:
                break
            providers = [p for p in found if p.peer_id not in tried]
            if model is not None:
                providers = [p for p in providers if any(m.name == model for m in p.models)]
            if not providers:
                if not tried:
                    raise NoProvider(f"no provider of {capability!r}" + (f" with model {model!r}" if model else "") + " found")
                break
            with trio.move_on_after(max(0.0, deadline - self.wall_clock())):
                await self._measure_unknown(providers, capability)
            for provider in rank_providers(providers, self.stats, key=lambda p: p.peer_id, now=trio.current_time()):
                if self.wall_clock() >= deadline:
                    break
                tried.add(provider.peer_id)
                try:
                    answer = await self._ask_one(provider, capability, text, params or {}, model, deadline, on_chunk)
                except _ProviderFailed as exc:
                    failures.append((provider.peer_id, str(exc)))
                    if exc.after_first_chunk:
                        raise RequestFailed(f"{provider.peer_id.short()} failed mid-answer: {exc}", failures, exc.code) from None
                    if exc.code == reason.INVALID_INPUT:
                        # The input is at fault, not the provider: another would refuse it too.
                        raise RequestFailed(f"{capability}: {exc}", failures, exc.code) from None
                    logger.info("provider %s failed before its first chunk: %s", provider.peer_id.short(), exc)
                    continue
                return dataclasses.replace(answer, elapsed=trio.current_time() - started, attempts=tuple(failures))
        if not failures:
            raise RequestFailed("the deadline passed before any provider answered")
        summary = failures[0][1] if len(failures) == 1 else f"all {len(failures)} providers failed"
        raise RequestFailed(f"{capability}: {summary}", failures)

    async def _measure_unknown(self, providers: Sequence[Provider], capability: str) -> None:
        """Negotiate sessions with providers we have no latency for, concurrently.

        The session round trip is the latency sample that ranks them, so a fresh node does
        not send its first request to an arbitrary provider. Once the first one answers,
        the others get as long again and are then left for later: a dead provider must not
        hold up the request.
        """
        unknown = [p for p in providers if p.peer_id not in self.stats][: self.config.dht.alpha + 2]
        if not unknown:
            return
        started = trio.current_time()

        async with trio.open_nursery() as nursery:

            async def measure(provider: Provider) -> None:
                try:
                    await self._grant_for(provider.peer_id, capability)
                except _ProviderFailed as exc:
                    logger.info("session with %s failed: %s", provider.peer_id.short(), exc)
                    return
                if nursery.cancel_scope.deadline == math.inf:
                    now = trio.current_time()
                    nursery.cancel_scope.deadline = now + (now - started)

            for provider in unknown:
                nursery.start_soon(measure, provider)

    def _stats_for(self, peer: PeerID) -> ProviderStats:
        stats = self.stats.get(peer)
        if stats is None:
            stats = self.stats[peer] = ProviderStats()
        return stats

    async def _grant_for(self, peer: PeerID, capability: str) -> session.Grant:
        now = self.wall_clock()
        grant = self._grants.get((peer, capability))
        # Keep a margin so a grant does not expire between our check and the provider's.
        if grant is not None and grant.expires > now + 5:
            return grant
        started = trio.current_time()
        client = session.ClientSession(self.key, provider=peer, now=now)
        try:
            with trio.fail_after(self.config.network_timeout):
                async with _open_stream(self.host, peer, session.SESSION_PROTOCOL) as stream:
                    await stream.write(client.send_offer(capability))
                    event = await _next_event(stream, client)
        except trio.TooSlowError:
            self._stats_for(peer).record_failure(trio.current_time())
            raise _ProviderFailed("session negotiation timed out") from None
        except (P2PError, ProtocolError, IdentityError) as exc:
            self._stats_for(peer).record_failure(trio.current_time())
            raise _ProviderFailed(f"session negotiation failed: {exc}") from None
        if isinstance(event, session.Refusal):
            raise _ProviderFailed(f"refused: {event.code}: {event.reason}")
        self._stats_for(peer).record_latency(trio.current_time() - started, load=_load(event))
        self._grants[(peer, capability)] = event
        return event

    async def _ask_one(
        self,
        provider: Provider,
        capability: str,
        text: str,
        params: Mapping[str, Any],
        model: str | None,
        deadline: float,
        on_chunk: Callable[[PeerID, str], None] | None,
    ) -> Answer:
        try:
            return await self._ask_with_grant(provider, capability, text, params, model, deadline, on_chunk)
        except _GrantRejected:
            # A grant we cached was refused (expired early, provider restarted): one new session.
            return await self._ask_with_grant(provider, capability, text, params, model, deadline, on_chunk)

    async def _ask_with_grant(
        self,
        provider: Provider,
        capability: str,
        text: str,
        params: Mapping[str, Any],
        model: str | None,
        deadline: float,
        on_chunk: Callable[[PeerID, str], None] | None,
    ) -> Answer:
        peer = provider.peer_id
        cached = (peer, capability) in self._grants
        grant = await self._grant_for(peer, capability)
        request = reason.Request(
            request_id=os.urandom(16),
            capability=capability,
            input=text,
            params=dict(params),
            deadline=deadline,
            hop_limit=DEFAULT_HOP_LIMIT,
            visited=(self.peer_id,),
            grant=grant.record.encode(),
            model=model,
        )
        client = reason.ReasonClient(provider=peer)
        chunks: list[str] = []
        stats = self._stats_for(peer)
        started = trio.current_time()
        first_chunk_at: float | None = None
        remaining = max(0.0, deadline - self.wall_clock())
        try:
            with trio.fail_after(remaining):
                async with _open_stream(self.host, peer, reason.REASON_PROTOCOL) as stream:
                    await stream.write(client.send_request(request))
                    while True:
                        event = await _next_event(stream, client)
                        if first_chunk_at is None:
                            first_chunk_at = trio.current_time()
                        if isinstance(event, reason.Chunk):
                            chunks.append(event.text)
                            if on_chunk is not None:
                                on_chunk(peer, event.text)
                            continue
                        break
        except trio.TooSlowError:
            stats.record_failure(trio.current_time())
            raise _ProviderFailed("deadline exceeded", after_first_chunk=first_chunk_at is not None) from None
        except (P2PError, ProtocolError) as exc:
            stats.record_failure(trio.current_time())
            raise _ProviderFailed(str(exc) or type(exc).__name__, after_first_chunk=bool(chunks)) from None
        if isinstance(event, reason.Error):
            if event.code == reason.UNAUTHORIZED:
                self._grants.pop((peer, capability), None)
                if cached:
                    raise _GrantRejected(f"{event.code}: {event.message}")
            if event.code != reason.INVALID_INPUT:  # refusing bad input is the provider doing its job
                stats.record_failure(trio.current_time())
            raise _ProviderFailed(f"{event.code}: {event.message}", after_first_chunk=bool(chunks), code=event.code)
        try:
            reason.open_receipt(event.receipt, provider=peer)
        except (IdentityError, ProtocolError) as exc:
            stats.record_failure(trio.current_time())
            raise _ProviderFailed(f"bad receipt: {exc}", after_first_chunk=bool(chunks)) from None
        stats.record_latency(first_chunk_at - started if first_chunk_at else trio.current_time() - started)
        stats.record_success()
        return Answer(
            capability=capability,
            provider=peer,
            model=event.model,
            output=event.output,
            chunks=tuple(chunks),
            usage=event.usage,
            receipt=event.receipt,
            elapsed=0.0,
            attempts=(),
        )

    # -- serving ------------------------------------------------------------------------

    def _models_for(self, capability: str) -> list[tuple[ModelInfo, Backend]]:
        matching = []
        for info, backend in self._models.values():
            mc = cap.ModelCapability(name=info.name, task=info.task, tags=tuple(info.tags))
            if mc.matches(capability):
                matching.append((info, backend))
        return matching

    def _load(self) -> tuple[int, int]:
        return self._serving, self.config.max_concurrent_requests

    async def _handle_session(self, stream) -> None:
        provider = session.ProviderSession(self.key, remote=stream.remote_peer, now=self.wall_clock())
        async with _closing(stream):
            try:
                with trio.fail_after(self.config.network_timeout):
                    offer = await _next_event(stream, provider)
                tag = cap.normalize_tag(offer.capability)
            except (trio.TooSlowError, ProtocolError, IdentityError, P2PError) as exc:
                logger.info("bad session offer from %s: %s", stream.remote_peer.short(), exc)
                with trio.move_on_after(self.config.network_timeout):
                    await stream.write(provider.send_refusal(session.BAD_OFFER, str(exc) or type(exc).__name__))
                return
            models = self._models_for(tag)
            if not models:
                await stream.write(provider.send_refusal(session.NO_SUCH_CAPABILITY, f"this node does not serve {tag!r}"))
                return
            serving, capacity = self._load()
            limits = session.Limits(
                max_concurrent=capacity,
                max_input_bytes=max(info.max_input_bytes for info, _ in models),
                requests_per_minute=6000,
            )
            data, _grant = provider.send_grant(
                capability=tag,
                limits=limits,
                expires=self.wall_clock() + self.config.session_ttl,
                queue=serving,
                capacity=capacity,
            )
            await stream.write(data)

    async def _handle_reason(self, stream) -> None:
        server = reason.ReasonServer()
        remote = stream.remote_peer
        async with _closing(stream):
            try:
                with trio.fail_after(self.config.network_timeout):
                    request = await _next_event(stream, server)
            except (trio.TooSlowError, ProtocolError, P2PError) as exc:
                logger.info("bad request from %s: %s", remote.short(), exc)
                return
            error = self._check_request(request, remote)
            if error is not None:
                await _send_quietly(stream, server, error)
                return
            self._serving += 1
            try:
                await self._serve_request(stream, server, request, remote)
            finally:
                self._serving -= 1

    def _check_request(self, request: reason.Request, remote: PeerID) -> reason.Error | None:
        now = self.wall_clock()
        if request.deadline <= now:
            return reason.Error(reason.DEADLINE_EXCEEDED, "the request's deadline has passed", False)
        if self.peer_id in request.visited:
            return reason.Error(reason.LOOP, "this node already handled the request", False)
        if request.hop_limit <= 0:
            return reason.Error(reason.HOP_LIMIT, "hop limit reached", False)
        if request.grant is None:
            return reason.Error(reason.UNAUTHORIZED, "no session grant: negotiate a session first", True)
        try:
            session.open_grant(
                request.grant, now=now, client=remote, provider=self.peer_id, capability=cap.normalize_tag(request.capability)
            )
        except (IdentityError, ProtocolError) as exc:
            return reason.Error(reason.UNAUTHORIZED, f"grant rejected: {exc}", True)
        if self._serving >= self.config.max_concurrent_requests:
            return reason.Error(reason.OVERLOADED, f"{self._serving} requests in progress", True)
        models = self._models_for(request.capability)
        if request.model is not None:
            models = [(i, b) for i, b in models if i.name == request.model]
        if not models:
            return reason.Error(reason.NO_SUCH_CAPABILITY, f"no model here serves {request.capability!r}", True)
        if len(request.input.encode()) > models[0][0].max_input_bytes:
            return reason.Error(reason.INVALID_INPUT, f"input exceeds {models[0][0].max_input_bytes} bytes", False)
        return None

    async def _serve_request(self, stream: Stream, server: reason.ReasonServer, request: reason.Request, remote: PeerID) -> None:
        info, backend = next(m for m in self._models_for(request.capability) if request.model in (None, m[0].name))
        started = trio.current_time()
        remaining = request.deadline - self.wall_clock()
        output: Any = None
        seq = 0
        async with trio.open_nursery() as nursery:
            # The asker going away (EOF or reset on our read side) cancels the work.
            nursery.start_soon(_cancel_on_eof, stream, server, nursery.cancel_scope)
            try:
                with trio.fail_after(remaining):
                    async for item in backend.run(info.name, request.input, request.params):
                        if isinstance(item, ModelChunk):
                            await stream.write(server.send(reason.Chunk(seq, item.text)))
                            seq += 1
                        elif isinstance(item, ModelOutput):
                            output = item.value
            except trio.TooSlowError:
                await _send_quietly(stream, server, reason.Error(reason.DEADLINE_EXCEEDED, "deadline passed while working", False))
                nursery.cancel_scope.cancel()
                return
            except ModelError as exc:
                await _send_quietly(stream, server, reason.Error(_model_error_code(exc), str(exc), False))
                nursery.cancel_scope.cancel()
                return
            except P2PError:
                logger.info("asker %s went away mid-answer", remote.short())
                nursery.cancel_scope.cancel()
                return
            compute_ms = (trio.current_time() - started) * 1000
            output_bytes = reason.encode_output(output)
            receipt = reason.make_receipt(
                self.key, request=request, client=remote, model=info.name, output_bytes=output_bytes, now=self.wall_clock()
            )
            usage = reason.Usage(input_bytes=len(request.input.encode()), output_bytes=len(output_bytes), compute_ms=compute_ms)
            await _send_quietly(stream, server, reason.Result(output=output, model=info.name, usage=usage, receipt=receipt))
            nursery.cancel_scope.cancel()


class _ProviderFailed(Exception):
    """Internal: one provider failed; the router decides whether to fail over."""

    def __init__(self, message: str, *, after_first_chunk: bool = False, code: str | None = None) -> None:
        super().__init__(message)
        self.after_first_chunk = after_first_chunk
        self.code = code


class _GrantRejected(_ProviderFailed):
    """Internal: the provider refused a cached grant; a new session may succeed."""


def _load(grant: session.Grant) -> float:
    return grant.queue / grant.capacity if grant.capacity else 0.0


def _model_error_code(exc: ModelError) -> str:
    if isinstance(exc, InvalidInput):
        return reason.INVALID_INPUT
    if isinstance(exc, UnknownModel):
        return reason.NO_SUCH_CAPABILITY
    return reason.INTERNAL


async def _next_event(stream: Stream, machine):
    """Feed stream bytes into a sans-IO machine until it yields an event."""
    while True:
        event = machine.next_event()
        if event is not None:
            return event
        data = await stream.read()
        if not data:
            raise StreamClosed("the stream ended before an answer")
        machine.receive_data(data)


@contextlib.asynccontextmanager
async def _closing(stream: Stream) -> AsyncIterator[Stream]:
    """Close the stream on the way out; reset it if an error is on its way up."""
    try:
        yield stream
    except BaseException:
        with trio.CancelScope(shield=True):
            await stream.reset()
        raise
    else:
        await stream.close()


@contextlib.asynccontextmanager
async def _open_stream(host: Host, peer: PeerID, protocol: str) -> AsyncIterator[Stream]:
    stream = await host.new_stream(peer, [protocol])
    async with _closing(stream):
        yield stream


async def _cancel_on_eof(stream: Stream, server: reason.ReasonServer, scope: trio.CancelScope) -> None:
    """The asker closing or resetting its stream cancels the work done for it."""
    try:
        while data := await stream.read():
            server.receive_data(data)  # anything after the request is a protocol violation
    except (P2PError, ProtocolError) as exc:
        logger.info("cancelling: %s", exc)
    scope.cancel()


async def _send_quietly(stream: Stream, server: reason.ReasonServer, event) -> None:
    try:
        await stream.write(server.send(event))
    except P2PError:
        logger.info("could not deliver %s: the asker went away", type(event).__name__)
