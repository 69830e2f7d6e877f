"""Length-prefixed frames: an unsigned varint length, then that many bytes.

The same framing as libp2p's kad-dht and most libp2p request/response protocols, so one
decoder serves every protocol we speak. Sans-IO: bytes in, frames out.
"""

from __future__ import annotations

from collections import deque

from .errors import FrameTooLarge, LocalProtocolError, RemoteProtocolError

DEFAULT_MAX_FRAME = 1 << 20  # 1 MiB: far above any record or request we send
_MAX_VARINT_BYTES = 10


def encode_uvarint(value: int) -> bytes:
    if value < 0:
        raise LocalProtocolError("varint must be non-negative")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_uvarint(data: bytes | memoryview, offset: int = 0) -> tuple[int, int] | None:
    """Return ``(value, next_offset)``, or None if ``data`` ends inside the varint."""
    value = 0
    shift = 0
    for i in range(offset, min(len(data), offset + _MAX_VARINT_BYTES)):
        byte = data[i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i + 1
        shift += 7
    if len(data) - offset >= _MAX_VARINT_BYTES:
        raise RemoteProtocolError("varint longer than 10 bytes")
    return None


def encode_frame(payload: bytes, max_size: int = DEFAULT_MAX_FRAME) -> bytes:
    if len(payload) > max_size:
        raise LocalProtocolError(f"frame of {len(payload)} bytes exceeds the limit of {max_size}")
    return encode_uvarint(len(payload)) + payload


class FrameDecoder:
    """Feed bytes with :meth:`receive_data`; take whole frames with :meth:`next_frame`."""

    def __init__(self, max_size: int = DEFAULT_MAX_FRAME) -> None:
        self.max_size = max_size
        self._buffer = bytearray()
        self._frames: deque[bytes] = deque()

    def receive_data(self, data: bytes) -> None:
        self._buffer += data
        while True:
            header = decode_uvarint(self._buffer)
            if header is None:
                return
            length, start = header
            if length > self.max_size:
                raise FrameTooLarge(f"frame of {length} bytes exceeds the limit of {self.max_size}")
            if len(self._buffer) - start < length:
                return
            self._frames.append(bytes(self._buffer[start : start + length]))
            del self._buffer[: start + length]

    def next_frame(self) -> bytes | None:
        return self._frames.popleft() if self._frames else None

    @property
    def pending_bytes(self) -> int:
        """Bytes of a frame not yet complete (non-zero at EOF means a truncated frame)."""
        return len(self._buffer)
