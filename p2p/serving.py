"""The provider side of a node: session grants and reasoning requests, with limits.

Every inbound stream is one exchange. A peer gets a grant (signed, bound to its peer id,
with the limits it will be held to) or a typed refusal; a request is checked (deadline, hop
limit, loop, grant, per-peer and total load, input size) before any model runs; the work
stops when the request's budget runs out (capped by ``max_request_seconds``) or when the
asker resets the stream, and the answer ends with a signed receipt.

Models may have an access policy (:mod:`modelnet.protocols.access`). A session offer's
credentials are checked against the policies of the models matching its capability: a
peer admitted by none of them is refused ``FORBIDDEN`` with the reason; otherwise the grant
lists no models, but its expiry never outlives the certificate that admitted the peer. The
certificates a peer proved are remembered (per peer and organisation, bounded), and every
request is checked again against the policy of the model it would run, so a revoked or
expired member's grants stop working, and a grant obtained for a public model does not open
a private one.

A node that forwards (``Config.forwarding``) also grants sessions and takes requests for
capabilities it does not serve, and hands them to its :data:`Forwarder`, under the same
checks, limits, budget and cancellation as its own work. A request that passed through
other peers before the one asking us (``visited``) is a forwarded request: private models
are never served to it, whatever the forwarder may prove (its membership is its own, not
the original asker's), and it looks to the asker as if they were not here.

Session negotiations are limited per peer like requests (``max_sessions_per_peer`` at once,
``sessions_per_minute_per_peer``), and credentials of organisations no policy here names
are dropped before their signatures are checked: an offer costs at most the signatures
that can matter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from collections import Counter, OrderedDict
from typing import Any, Awaitable, Callable, Mapping, Sequence

import trio

from modelnet.identity import IdentityError, MembershipCertificate, PeerID, PrivateKey, SignedRecord
from modelnet.models.base import Backend, InvalidInput, ModelError, ModelInfo, UnknownModel, UpstreamBusy, UpstreamError
from modelnet.models.base import Chunk as ModelChunk
from modelnet.models.base import Output as ModelOutput
from modelnet.protocols import access
from modelnet.protocols import capability as cap
from modelnet.protocols import reason, session
from modelnet.protocols.errors import LocalProtocolError, ProtocolError

from .config import Config
from .errors import P2PError, StreamClosed
from .exchange import clip, closing, next_event, send_quietly
from .host import Stream
from .trust import PolicyError, Revocations

logger = logging.getLogger(__name__)

MAX_REMEMBERED_MEMBERS = 4096  # peers whose proven certificates we keep (least recent dropped)


@dataclasses.dataclass(frozen=True)
class ServedModel:
    capability: cap.ModelCapability  # what the record says about it
    info: ModelInfo
    backend: Backend


# Routes a request onward for ``remote``, streaming chunk texts through ``emit`` as they
# arrive; returns the result to send back (or a typed error). See p2p/forwarding.py.
Forwarder = Callable[
    [reason.Request, PeerID, Callable[[str], Awaitable[None]]], Awaitable["reason.Result | reason.Error"]
]


def model_capability(info: ModelInfo) -> cap.ModelCapability:
    return cap.ModelCapability(
        name=info.name,
        task=info.task,
        tags=tuple(info.tags),
        description=info.description,
        max_input_bytes=info.max_input_bytes,
        streaming=info.streaming,
        context_length=info.context_length,
        max_output_tokens=info.max_output_tokens,
    )


class ModelServer:
    """Answers ``/modelnet/session/1.0.0`` and ``/modelnet/reason/1.0.0`` streams."""

    def __init__(
        self,
        key: PrivateKey,
        backends: Sequence[Backend],
        config: Config,
        wall_clock: Callable[[], float],
        *,
        policies: Mapping[str, access.AccessPolicy] = {},
        revocations: Revocations | None = None,
    ) -> None:
        self.key = key
        self.config = config
        self.wall_clock = wall_clock
        self.models: dict[str, ServedModel] = {}
        for backend in backends:
            for info in backend.models():
                self.models[info.name] = ServedModel(model_capability(info), info, backend)
        unknown = sorted(set(policies) - set(self.models))
        if unknown:
            raise PolicyError(f"access policy for model(s) this node does not serve: {', '.join(unknown)}")
        self.policies = {name: policy for name, policy in policies.items() if not policy.public}
        self.revocations = revocations if revocations is not None else Revocations()
        # peer -> org -> the newest certificate it proved (only orgs some policy names)
        self._members: OrderedDict[PeerID, dict[PeerID, MembershipCertificate]] = OrderedDict()
        self.in_flight = 0
        self._in_flight_by_peer: Counter[PeerID] = Counter()
        self._requests_this_minute = _PerMinute(config.requests_per_minute_per_peer)
        self._sessions_by_peer: Counter[PeerID] = Counter()  # negotiations in progress
        self._sessions_this_minute = _PerMinute(config.sessions_per_minute_per_peer)
        self.forwarder: Forwarder | None = None

    def matching(self, capability: str, model: str | None = None) -> list[ServedModel]:
        return [
            served
            for served in self.models.values()
            if served.capability.matches(capability) and model in (None, served.info.name)
        ]

    # -- sessions -----------------------------------------------------------------------

    async def handle_session(self, stream: Stream) -> None:
        remote = stream.remote_peer
        now = self.wall_clock()
        provider = session.ProviderSession(self.key, remote=remote, now=now)
        async with closing(stream):
            # Refused before the offer is read: a flood costs us no signature checks.
            busy = None
            if self._sessions_by_peer[remote] >= self.config.max_sessions_per_peer:
                busy = f"at most {self.config.max_sessions_per_peer} session negotiations at once per peer"
            elif not self._sessions_this_minute.take(remote, now):
                busy = f"at most {self.config.sessions_per_minute_per_peer} session negotiations a minute per peer"
            if busy is not None:
                logger.info("refused a session to %s: %s", remote.short(), busy)
                await send_quietly(stream, provider.send_refusal(session.OVERLOADED, busy))
                return
            self._sessions_by_peer[remote] += 1
            try:
                await self._negotiate(stream, provider, remote)
            finally:
                self._sessions_by_peer[remote] -= 1
                if not self._sessions_by_peer[remote]:
                    del self._sessions_by_peer[remote]

    async def _negotiate(self, stream: Stream, provider: session.ProviderSession, remote: PeerID) -> None:
        """Read the offer; answer with a grant or a typed refusal."""
        try:
            with trio.fail_after(self.config.network_timeout):
                offer = await next_event(stream, provider)
            tag = cap.normalize_tag(offer.capability)
        except (trio.TooSlowError, ProtocolError, IdentityError, P2PError) as exc:
            why = clip(exc or type(exc).__name__)
            logger.info("bad session offer from %s: %s", remote.short(), why)
            with trio.move_on_after(self.config.network_timeout):
                await send_quietly(stream, provider.send_refusal(session.BAD_OFFER, why))
            return
        models = self.matching(tag)
        if not models and self.forwarder is None:
            await send_quietly(stream, provider.send_refusal(session.NO_SUCH_CAPABILITY, f"this node does not serve {tag!r}"))
            return
        now = self.wall_clock()
        until = math.inf
        if models:  # a capability we only forward is judged by the provider's own policy
            certificates, denials = self._remember(remote, offer.credentials, now)
            try:
                models, until = self._admitted(models, remote, certificates, now, denials)
            except access.AccessDenied as exc:
                logger.info("refused %s access to %s: %s", remote.short(), tag, exc)
                await send_quietly(stream, provider.send_refusal(session.FORBIDDEN, clip(exc, session.MAX_REASON_CHARS)))
                return
        limits = session.Limits(
            max_concurrent=self.config.max_requests_per_peer,
            max_input_bytes=max((m.info.max_input_bytes for m in models), default=reason.MAX_INPUT_BYTES),
            requests_per_minute=self.config.requests_per_minute_per_peer,
        )
        data, _ = provider.send_grant(
            grant_id=os.urandom(session.GRANT_ID_BYTES),
            capability=tag,
            limits=limits,
            expires=min(now + self.config.session_ttl, until),
            queue=self.in_flight,
            capacity=self.config.max_concurrent_requests,
        )
        await send_quietly(stream, data)

    def _remember(
        self, peer: PeerID, credentials: Sequence[bytes], now: float
    ) -> tuple[list[MembershipCertificate], list[access.Denial]]:
        """Open the offered certificates of organisations our policies name, and keep them.

        A certificate of any other organisation could admit nobody here: it is dropped
        (with a denial saying so) before its signature costs us anything.
        """
        if not self.policies:
            return [], []
        orgs = {org for policy in self.policies.values() for org in policy.orgs}
        wanted: list[bytes] = []
        skipped: list[access.Denial] = []
        for data in credentials:
            try:
                signer = SignedRecord.decode(data).signer  # not verified: only to skip it
            except (IdentityError, TypeError):
                wanted.append(data)  # open_credentials says what is wrong with it
                continue
            if signer in orgs:
                wanted.append(data)
            else:
                skipped.append((access.WRONG_ORG, f"a certificate from {signer} is not from an organisation any model here admits"))
        fresh, denials = access.open_credentials(wanted, peer=peer, now=now)
        held = self._members.pop(peer, {})
        for certificate in fresh:
            old = held.get(certificate.org)
            if old is None or certificate.expires >= old.expires:
                held[certificate.org] = certificate
        held = {org: c for org, c in held.items() if c.expires > now}
        if held:
            self._members[peer] = held
            while len(self._members) > MAX_REMEMBERED_MEMBERS:
                self._members.popitem(last=False)
        return list(held.values()), denials + skipped

    def _admitted(
        self,
        models: Sequence[ServedModel],
        peer: PeerID,
        certificates: Sequence[MembershipCertificate],
        now: float,
        denials: Sequence[access.Denial] = (),
    ) -> tuple[list[ServedModel], float]:
        """The models ``peer`` may use, and until when (the admitting certificates' expiry).

        :class:`access.AccessDenied` (the first model's reason) if none.
        """
        allowed: list[ServedModel] = []
        until = math.inf
        refusal: access.AccessDenied | None = None
        for served in models:
            policy = self.policies.get(served.info.name, access.PUBLIC)
            try:
                certificate = access.admit(
                    policy,
                    peer=peer,
                    certificates=certificates,
                    now=now,
                    is_revoked=self.revocations.is_revoked,
                    denials=denials,
                )
            except access.AccessDenied as exc:
                refusal = refusal or exc
                continue
            allowed.append(served)
            if certificate is not None:
                until = min(until, certificate.expires)
        if not allowed:
            assert refusal is not None
            raise refusal
        return allowed, until

    # -- requests -----------------------------------------------------------------------

    async def handle_reason(self, stream: Stream) -> None:
        server = reason.ReasonServer()
        remote = stream.remote_peer
        async with closing(stream):
            try:
                with trio.fail_after(self.config.network_timeout):
                    request = await next_event(stream, server)
            except (trio.TooSlowError, ProtocolError, P2PError) as exc:
                why = clip(exc or type(exc).__name__)
                logger.info("bad request from %s: %s", remote.short(), why)
                with trio.move_on_after(self.config.network_timeout):
                    await send_quietly(stream, server.send(reason.Error(reason.INVALID_INPUT, f"malformed request: {why}", False)))
                return
            checked = self._check(request, remote)
            if isinstance(checked, reason.Error):
                await send_quietly(stream, server.send(checked))
                return
            self.in_flight += 1
            self._in_flight_by_peer[remote] += 1
            try:
                await self._serve(stream, server, request, remote, checked)
            finally:
                self.in_flight -= 1
                self._in_flight_by_peer[remote] -= 1
                if not self._in_flight_by_peer[remote]:
                    del self._in_flight_by_peer[remote]

    def _check(self, request: reason.Request, remote: PeerID) -> reason.Error | ServedModel | None:
        """The model that will answer ``request`` (None: forward it), or the error that refuses it."""
        now = self.wall_clock()
        if request.budget <= 0:
            return reason.Error(reason.DEADLINE_EXCEEDED, "the request's deadline has passed", False)
        if self.key.peer_id in request.visited:
            return reason.Error(reason.LOOP, "this node already handled the request", False)
        if request.hop_limit <= 0:
            return reason.Error(reason.HOP_LIMIT, "hop limit reached", False)
        if request.grant is None:
            return reason.Error(reason.UNAUTHORIZED, "no session grant: negotiate a session first", True)
        try:
            capability = cap.normalize_tag(request.capability)
            session.open_grant(request.grant, now=now, client=remote, provider=self.key.peer_id, capability=capability)
        except (IdentityError, ProtocolError) as exc:
            return reason.Error(reason.UNAUTHORIZED, f"grant rejected: {clip(exc)}", True)
        if self.in_flight >= self.config.max_concurrent_requests:
            return reason.Error(reason.OVERLOADED, f"{self.in_flight} requests in progress", True)
        if self._in_flight_by_peer[remote] >= self.config.max_requests_per_peer:
            return reason.Error(reason.OVERLOADED, f"at most {self.config.max_requests_per_peer} requests at once per peer", True)
        if not self._requests_this_minute.take(remote, now):
            return reason.Error(reason.OVERLOADED, f"at most {self.config.requests_per_minute_per_peer} requests a minute per peer", True)
        models = self.matching(capability, request.model)
        if any(peer != remote for peer in request.visited):
            # Forwarded: whoever asked first proved no membership to us, so our private
            # models are as absent for it as for any stranger.
            models = [m for m in models if m.info.name not in self.policies]
        if not models and self.forwarder is None:
            return reason.Error(reason.NO_SUCH_CAPABILITY, f"no model here serves {capability!r}", True)
        if not models:  # a forwarder routes it onward; its own checks are the provider's
            if request.hop_limit < 2:
                return reason.Error(reason.HOP_LIMIT, "no hop left to forward the request", False)
            if len(request.visited) >= reason.MAX_VISITED:  # we could not add ourselves
                return reason.Error(reason.HOP_LIMIT, f"the request already visited {len(request.visited)} peers", False)
            served = None
            limit = reason.MAX_INPUT_BYTES
        else:
            try:
                served = self._admitted(models, remote, list(self._members.get(remote, {}).values()), now)[0][0]
            except access.AccessDenied as exc:
                # Retryable: the asker negotiates a new session, which says why if it fails too.
                return reason.Error(reason.UNAUTHORIZED, clip(f"forbidden: {exc}", reason.MAX_MESSAGE_CHARS), True)
            limit = served.info.max_input_bytes
        if len(request.input.encode()) > limit:
            return reason.Error(reason.INVALID_INPUT, f"input exceeds {limit} bytes", False)
        return served

    async def _serve(
        self, stream: Stream, server: reason.ReasonServer, request: reason.Request, remote: PeerID, served: ServedModel | None
    ) -> None:
        # The budget counts from now, on our own clock: no wall clock is compared across machines.
        budget = min(request.budget, self.config.max_request_seconds)
        seq = 0

        async def emit(text: str) -> None:
            nonlocal seq
            await stream.write(server.send(reason.Chunk(seq, text)))
            seq += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_asker, stream, nursery.cancel_scope)
            try:
                with trio.fail_after(budget):
                    if served is not None:
                        answer = await self._run_model(served, request, remote, emit, server.streamed)
                    else:
                        assert self.forwarder is not None  # _check refused the request otherwise
                        answer = await self.forwarder(request, remote, emit)
            except trio.TooSlowError:
                await send_quietly(stream, server.send(reason.Error(reason.DEADLINE_EXCEEDED, "deadline passed while working", False)))
            except ModelError as exc:
                # the full text stays here; the asker gets the public one (never a model
                # server's error body, which may echo a key or name internals)
                log = logger.warning if isinstance(exc, UpstreamError) else logger.info
                log("model failed for %s: %s", remote.short(), exc)
                error = reason.Error(_error_code(exc), clip(exc.public, 1000), isinstance(exc, (UpstreamError, UnknownModel)))
                await send_quietly(stream, server.send(error))
            except LocalProtocolError as exc:  # a chunk or output our protocol cannot carry
                await send_quietly(stream, server.send(_unsendable(exc, remote)))
            except StreamClosed:
                logger.info("asker %s went away mid-answer", remote.short())
            else:
                try:
                    data = server.send(answer)
                except LocalProtocolError as exc:  # the result is over a frame
                    data = server.send(_unsendable(exc, remote))
                await send_quietly(stream, data)
            nursery.cancel_scope.cancel()

    async def _run_model(
        self,
        served: ServedModel,
        request: reason.Request,
        remote: PeerID,
        emit: Callable[[str], Awaitable[None]],
        streamed: reason.ChunkDigest,
    ) -> reason.Result:
        """Run the model, streaming its chunks through ``emit``; the result's receipt commits
        to ``streamed``, the digest of the chunks sent."""
        started = trio.current_time()
        output: Any = None
        async with contextlib.aclosing(served.backend.run(served.info.name, request.input, request.params)) as items:
            async for item in items:
                if isinstance(item, ModelChunk):
                    await emit(item.text)
                elif isinstance(item, ModelOutput):
                    output = item.value
        output_bytes = reason.encode_output(output)
        receipt = reason.make_receipt(
            self.key,
            request=request,
            client=remote,
            model=served.info.name,
            output_bytes=output_bytes,
            chunks_sha256=streamed.digest(),
            now=self.wall_clock(),
        )
        usage = reason.Usage(
            input_bytes=len(request.input.encode()),
            output_bytes=len(output_bytes),
            compute_ms=(trio.current_time() - started) * 1000,
        )
        return reason.Result(output=output, model=served.info.name, usage=usage, receipt=receipt, **self.load())

    def load(self) -> dict[str, int]:
        """What a result reports: the other requests in progress here, of how many at once."""
        return {"queue": max(self.in_flight - 1, 0), "capacity": self.config.max_concurrent_requests}


def _unsendable(exc: LocalProtocolError, remote: PeerID) -> reason.Error:
    """The typed error that replaces an answer our protocol cannot carry (a chunk or
    result over a frame, an output with no canonical encoding), not a reset stream."""
    logger.warning("the answer to %s cannot be sent: %s", remote.short(), exc)
    return reason.Error(reason.INTERNAL, clip(f"output too large or not encodable: {exc}", 1000), False)


class _PerMinute:
    """Counts per peer in fixed one-minute windows: cheap, and bounded by the peers of one minute."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._minute = -1
        self._counts: Counter[PeerID] = Counter()

    def take(self, peer: PeerID, now: float) -> bool:
        """Count one for ``peer``; False (nothing counted) once it used this minute's ``limit``."""
        if int(now // 60) != self._minute:
            self._minute, self._counts = int(now // 60), Counter()
        if self._counts[peer] >= self.limit:
            return False
        self._counts[peer] += 1
        return True


async def _watch_asker(stream: Stream, scope: trio.CancelScope) -> None:
    """Cancel the work if the asker resets the stream or breaks the protocol.

    A clean end of stream is not a cancellation: many libp2p clients close their side
    right after the request and wait for the answer.
    """
    try:
        data = await stream.read(1)
    except StreamClosed:
        logger.info("asker %s reset the stream: cancelling its request", stream.remote_peer.short())
        scope.cancel()
        return
    if data:  # nothing may follow the request; stop, and hold none of it in memory
        logger.info("asker %s sent bytes after its request: cancelling it", stream.remote_peer.short())
        scope.cancel()
        with trio.CancelScope(shield=True):  # our own scope is cancelled now
            await stream.reset()


def _error_code(exc: ModelError) -> str:
    """The reason code for a model's failure; only INVALID_INPUT stops the asker failing over."""
    if isinstance(exc, InvalidInput):
        return reason.INVALID_INPUT
    if isinstance(exc, UnknownModel):
        return reason.NO_SUCH_CAPABILITY
    if isinstance(exc, UpstreamBusy):  # ranked down by the asker, not banned
        return reason.OVERLOADED
    return reason.INTERNAL  # upstream 5xx, timeouts, unreachable: retryable elsewhere
