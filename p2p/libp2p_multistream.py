"""multistream-select 1.0.0 on a libp2p NetStream, both ways, in place of libp2p's own.

As the initiator it pipelines (the handshake and the first proposal in one write: one
round trip instead of two); as the responder it reads in buffered chunks (libp2p reads
byte by byte, sending a Yamux window update each time). "Not supported" is told apart
from a broken stream, and a malformed message is a RemoteProtocolError (the caller resets
the stream). Bytes read past the negotiation are returned, for the protocol to read first.
"""

from __future__ import annotations

from typing import Container, Sequence

from libp2p.abc import INetStream

from modelnet.protocols.errors import RemoteProtocolError
from modelnet.protocols.framing import decode_uvarint, encode_uvarint

from .errors import ProtocolNotSupported

_MULTISTREAM = b"/multistream/1.0.0\n"
_NOT_SUPPORTED = b"na\n"
_MAX_NEGOTIATION_MESSAGE = 1024


def _delimited(message: bytes) -> bytes:
    return encode_uvarint(len(message)) + message


class _MessageReader:
    """Reads multistream-select messages (varint-delimited) without reading byte by byte;
    what it reads past the negotiation is handed to the protocol as pending bytes."""

    def __init__(self, net_stream: INetStream) -> None:
        self._net_stream = net_stream
        self._buffer = bytearray()

    async def next_message(self) -> bytes:
        buffer = self._buffer
        while True:
            header = decode_uvarint(buffer)
            if header is not None:
                length, start = header
                if length > _MAX_NEGOTIATION_MESSAGE:
                    raise RemoteProtocolError(f"negotiation message of {length} bytes")
                if len(buffer) - start >= length:
                    message = bytes(buffer[start : start + length])
                    del buffer[: start + length]
                    return message
            data = await self._net_stream.read(65536)
            if not data:
                raise RemoteProtocolError("stream ended during protocol negotiation")
            buffer.extend(data)

    def has_message(self) -> bool:
        header = decode_uvarint(self._buffer)
        return header is not None and len(self._buffer) - header[1] >= header[0]

    def rest(self) -> bytes:
        return bytes(self._buffer)


async def negotiate(net_stream: INetStream, protocols: Sequence[str]) -> tuple[str, bytes]:
    """multistream-select as the initiator; return the protocol and any bytes read past it."""
    reader = _MessageReader(net_stream)
    proposals = [p.encode() + b"\n" for p in protocols]
    # pipelined: the handshake and the first proposal go together (multistream-select
    # allows it; go-libp2p does the same)
    await net_stream.write(_delimited(_MULTISTREAM) + _delimited(proposals[0]))
    if await reader.next_message() != _MULTISTREAM:
        raise RemoteProtocolError("peer does not speak multistream-select 1.0.0")
    for i, proposal in enumerate(proposals):
        if i:
            await net_stream.write(_delimited(proposal))
        answer = await reader.next_message()
        if answer == proposal:
            return protocols[i], reader.rest()
        if answer != _NOT_SUPPORTED:
            raise RemoteProtocolError(f"unexpected negotiation answer {answer[:64]!r}")
    raise ProtocolNotSupported(f"peer supports none of {list(protocols)}")


async def accept(net_stream: INetStream, supported: Container[str]) -> tuple[str, bytes]:
    """multistream-select as the responder; return the protocol and any bytes read past it.

    Answers ``na`` to a protocol it does not serve, and to ``ls`` (listing is optional in
    the spec; we do not tell strangers what we serve before they ask for it). A message
    without its trailing newline is malformed: RemoteProtocolError, and the caller resets
    the stream, as the spec asks.
    """
    reader = _MessageReader(net_stream)
    if await reader.next_message() != _MULTISTREAM:
        raise RemoteProtocolError("peer does not speak multistream-select 1.0.0")
    reply = _delimited(_MULTISTREAM)
    while True:
        if reply and not reader.has_message():
            # a client that does not pipeline waits for our answer before proposing
            await net_stream.write(reply)
            reply = b""
        message = await reader.next_message()
        if message == _MULTISTREAM:  # some peers restart the handshake; acknowledge again
            reply += _delimited(_MULTISTREAM)
            continue
        if not message.endswith(b"\n"):
            raise RemoteProtocolError(f"negotiation message without a newline: {message[:64]!r}")
        protocol = message[:-1].decode("utf-8", "replace")
        if protocol and protocol in supported:
            await net_stream.write(reply + _delimited(message))
            return protocol, reader.rest()
        await net_stream.write(reply + _delimited(_NOT_SUPPORTED))
        reply = b""
