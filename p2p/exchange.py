"""The short trio drivers around the sans-IO protocol machines (session, reason)."""

from __future__ import annotations

import contextlib
import logging
from typing import AsyncIterator

import trio

from modelnet.identity import PeerID

from .errors import P2PError, StreamClosed
from .host import Host, Stream

logger = logging.getLogger(__name__)


async def next_event(stream: Stream, machine):
    """Feed stream bytes into a sans-IO machine until it yields an event.

    End of stream is fed too (``receive_data(b"")``), so the machine decides whether it
    came too early; a machine that still has nothing raises StreamClosed.
    """
    while True:
        event = machine.next_event()
        if event is not None:
            return event
        data = await stream.read()
        machine.receive_data(data)
        if not data:
            event = machine.next_event()
            if event is None:
                raise StreamClosed("the stream ended before an answer")
            return event


@contextlib.asynccontextmanager
async def closing(stream: Stream) -> AsyncIterator[Stream]:
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
async def open_stream(host: Host, peer: PeerID, protocol: str) -> AsyncIterator[Stream]:
    stream = await host.new_stream(peer, [protocol])
    async with closing(stream):
        yield stream


async def send_quietly(stream: Stream, data: bytes) -> bool:
    """Write, or log that the peer went away; True if written."""
    try:
        await stream.write(data)
    except P2PError as exc:
        logger.info("could not answer %s: %s", stream.remote_peer.short(), exc)
        return False
    return True


def clip(text: object, limit: int = 200) -> str:
    """Peer-controlled text made safe to log or echo back: bounded and one line."""
    text = str(text).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"
