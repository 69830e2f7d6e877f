"""Forwarding: a node routes a request it cannot serve onward, and vouches for the answer.

The request keeps its id, input and parameters; the next hop gets one hop less (of at
most this node's own ``Config.hop_limit``, whatever the asker sent), this node added to
``visited`` (the router never sends to a visited peer, and a node refuses a request that
already visited it, so loops are impossible) and the budget this node has left. The node
routes it as it routes its own requests (ranking, failover, hedging, ``max_attempts``)
and, failing a provider in the DHT, through one of its ``Config.upstream`` peers. Chunks
stream back as they arrive; the result keeps the provider's receipt and gains this node's
signed forward statement (:mod:`modelnet.protocols.forward`), so the asker can verify the
whole route. The work runs inside the server's request handling: the node's limits, the
budget and the asker's reset (which cancels the onward stream, hop after hop) all apply.

Forwarding lends no authority. The request is routed anonymously (``_Ask.on_behalf_of``):
only public records are looked up, no membership certificate is presented, and grants are
negotiated and cached apart from the node's own. So a member that forwards never opens its
organisations' private models to strangers, and an organisation-private capability looks
to them exactly like one nobody serves: the same ``no-such-capability``.

Amplification is bounded: a forwarded request tries at most one upstream forwarder, and a
forwarder's "no provider" and "hop limit" are final (not retryable), so the asker does not
try every other path; a mesh of forwarders costs one request per hop, not one per path.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Awaitable, Callable

import trio

from modelnet.identity import PeerID
from modelnet.protocols import forward, reason

if TYPE_CHECKING:
    from .node import Node

logger = logging.getLogger(__name__)

# Codes a forwarder passes on as they are; any other failure downstream is its own.
_PASSED_ON = frozenset(
    {reason.INVALID_INPUT, reason.DEADLINE_EXCEEDED, reason.HOP_LIMIT, reason.LOOP, reason.NO_SUCH_CAPABILITY, reason.OVERLOADED}
)


class Forwarder:
    """The :data:`~.serving.Forwarder` of a node: ``await forwarder(request, remote, emit)``."""

    def __init__(self, node: "Node") -> None:
        self.node = node
        self.forwarded = 0  # requests answered through this node

    async def __call__(
        self, request: reason.Request, remote: PeerID, emit: Callable[[str], Awaitable[None]]
    ) -> reason.Result | reason.Error:
        from .node import NoProvider, RequestFailed, _Ask  # node imports this module

        node = self.node

        async def sink(peer: PeerID, text: str) -> None:
            await emit(text)

        ask = _Ask(
            capability=request.capability,
            text=request.input,
            params=request.params,
            model=request.model,
            deadline=trio.current_time() + min(request.budget, node.config.max_request_seconds),
            sink=sink,
            request_id=request.request_id,
            hop_limit=min(request.hop_limit, node.config.hop_limit) - 1,
            visited=request.visited,
            on_behalf_of=remote,
        )
        try:
            answer = await node.route(ask)
        except NoProvider as exc:
            # Final: we searched; another route would search the same DHT.
            return reason.Error(reason.NO_SUCH_CAPABILITY, f"forwarded, but {exc}", False)
        except RequestFailed as exc:
            code = exc.code if exc.code in _PASSED_ON else reason.INTERNAL
            retryable = code == reason.OVERLOADED  # busy providers may be free on another route
            return reason.Error(code, f"forwarded: {str(exc)[: reason.MAX_MESSAGE_CHARS - 11]}", retryable)
        nxt = answer.route[0] if answer.route else answer.provider
        statement = forward.make_statement(
            node.key, request_id=request.request_id, client=remote, next=nxt, receipt=answer.receipt, now=node.wall_clock()
        )
        self.forwarded += 1
        logger.info("forwarded %s for %s to %s", request.capability, remote.short(), nxt.short())
        return reason.Result(
            output=answer.output,
            model=answer.model,
            usage=answer.usage,
            receipt=answer.receipt,
            via=(statement, *answer.forwards),
            **node.server.load(),
        )
