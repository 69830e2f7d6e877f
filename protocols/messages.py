"""What every modelnet message protocol shares.

- A message is one frame (:mod:`.framing`) holding a canonical msgpack map whose ``kind``
  names it; fields a version does not know are ignored.
- Events validate themselves on construction and raise :class:`LocalProtocolError`; a
  decoder builds them inside :meth:`Endpoint._receiving`, which turns that (and identity
  errors such as a bad signature) into :class:`RemoteProtocolError`, because there the peer
  sent the bad value.
- :class:`Endpoint` is the sans-IO half every protocol endpoint shares: bytes in, a frame
  decoder, and one table of state transitions.
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import Any, Iterator, Mapping

from modelnet.identity import CanonicalEncodingError, IdentityError, canonical

from .errors import LocalProtocolError, RemoteProtocolError
from .framing import FrameDecoder, encode_frame

# states every endpoint uses; each protocol adds its own
IDLE = "idle"  # a client before it sends
AWAITING_ANSWER = "awaiting-answer"  # a client after it sent
DONE = "done"  # the exchange is over; anything more from the peer is an error
ERROR = "error"  # the peer broke the protocol; no more events
_REQUIRED = object()
_CODE = re.compile(r"[a-z][a-z0-9-]{0,31}")
INT64_MAX = (1 << 63) - 1


# ---- field checks: raise LocalProtocolError; decoders translate them --------------------


def check_int(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise LocalProtocolError(f"{name} must be an int in {lo}..{hi}")
    return value


def check_float(name: str, value: Any, *, lo: float = -math.inf, hi: float = math.inf) -> float:
    """A finite float in ``lo..hi``; ints are accepted and returned as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LocalProtocolError(f"{name} must be a number")
    value = float(value)
    if not (math.isfinite(value) and lo <= value <= hi):
        raise LocalProtocolError(f"{name} must be finite and in {lo}..{hi}")
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise LocalProtocolError(f"{name} must be a bool")
    return value


def check_str(name: str, value: Any, *, max_len: int, min_len: int = 0, utf8: bool = False) -> str:
    """A str of ``min_len..max_len`` chars (UTF-8 bytes with ``utf8=True``)."""
    if not isinstance(value, str):
        raise LocalProtocolError(f"{name} must be a str")
    try:
        encoded = value.encode("utf-8")
    except UnicodeEncodeError:
        raise LocalProtocolError(f"{name} is not valid Unicode text") from None
    size = len(encoded) if utf8 else len(value)
    if not min_len <= size <= max_len:
        unit = "bytes" if utf8 else "chars"
        raise LocalProtocolError(f"{name} must be {min_len}..{max_len} {unit}, not {size}")
    return value


def check_bytes(name: str, value: Any, *, max_len: int, min_len: int = 0) -> bytes:
    if not isinstance(value, bytes) or not min_len <= len(value) <= max_len:
        size = f"exactly {min_len}" if min_len == max_len else f"{min_len}..{max_len}"
        raise LocalProtocolError(f"{name} must be {size} bytes")
    return value


def check_tuple(name: str, value: Any, *, max_len: int) -> tuple[Any, ...]:
    if not isinstance(value, (tuple, list)) or len(value) > max_len:
        raise LocalProtocolError(f"{name} must be a sequence of at most {max_len} items")
    return tuple(value)


def check_code(name: str, value: Any, known: frozenset[str] | None = None) -> str:
    """A short lowercase code; ``known`` restricts it (codes we send); peers may send new ones."""
    if not isinstance(value, str) or not _CODE.fullmatch(value):
        raise LocalProtocolError(f"{name} must be a short lowercase code, not {value!r}")
    if known is not None and value not in known:
        raise LocalProtocolError(f"unknown {name} {value!r}; one of {sorted(known)}")
    return value


def set_field(obj: Any, name: str, value: Any) -> None:
    """Store a normalised value on a frozen dataclass from its ``__post_init__``."""
    object.__setattr__(obj, name, value)


# ---- messages ----------------------------------------------------------------------------


def pack_message(kind: str, fields: Mapping[str, Any], *, max_frame: int) -> bytes:
    """One framed canonical message; :class:`LocalProtocolError` if it can't be sent."""
    try:
        body = canonical.encode({**fields, "kind": kind})
    except CanonicalEncodingError as exc:
        raise LocalProtocolError(f"cannot encode {kind}: {exc}") from None
    return encode_frame(body, max_frame)


def decode_map(data: bytes, what: str, *, max_size: int = canonical.DEFAULT_MAX_SIZE) -> dict[str, Any]:
    """Canonical bytes that must hold a map; :class:`RemoteProtocolError` otherwise."""
    try:
        value = canonical.decode(data, max_size=max_size)
    except IdentityError as exc:
        raise RemoteProtocolError(f"malformed {what}: {exc}") from None
    if not isinstance(value, dict):
        raise RemoteProtocolError(f"malformed {what}: not a map")
    return value


def field(message: Mapping[str, Any], name: str, types: type | tuple[type, ...], default: Any = _REQUIRED) -> Any:
    """``message[name]`` if it has one of ``types`` (bool is not an int here)."""
    if name not in message:
        if default is _REQUIRED:
            raise RemoteProtocolError(f"message misses the field {name!r}")
        return default
    value = message[name]
    wanted = types if isinstance(types, tuple) else (types,)
    if (isinstance(value, bool) and bool not in wanted) or not isinstance(value, wanted):
        raise RemoteProtocolError(f"field {name!r} has the wrong type {type(value).__name__}")
    return value


@contextlib.contextmanager
def peer_input(what: str) -> Iterator[None]:
    """Values inside came from the peer: our validation errors become the peer's."""
    try:
        yield
    except RemoteProtocolError:
        raise
    except (LocalProtocolError, IdentityError) as exc:
        raise RemoteProtocolError(f"{what}: {exc}") from exc


# ---- the endpoint ------------------------------------------------------------------------


class Endpoint:
    """Frames in, state transitions from one table.

    ``table`` maps ``(state, event)`` to the next state; events are message kinds for
    what the peer sends and ``"send-<kind>"`` for what we send. ``eof_states`` are the
    states in which the peer may end the stream (``receive_data(b"")``).
    """

    def __init__(
        self, table: Mapping[tuple[str, str], str], initial: str, *, eof_states: frozenset[str], max_frame: int
    ) -> None:
        self._table = table
        self._eof_states = eof_states
        self._decoder = FrameDecoder(max_frame)
        self._eof = False
        self.max_frame = max_frame
        self.state = initial

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; ``b""`` means the peer ended the stream."""
        if not data:
            self._eof = True
            return
        if self._eof:
            raise LocalProtocolError("data received after end of stream")
        try:
            self._decoder.receive_data(data)
        except RemoteProtocolError:
            self.state = ERROR
            raise

    def _transition(self, kind: str) -> None:
        following = self._table.get((self.state, kind))
        if following is None:
            raise RemoteProtocolError(f"unexpected {kind!r} message in state {self.state}")
        self.state = following

    def _pack(self, kind: str, fields: Mapping[str, Any]) -> bytes:
        """Encode first, then move the state: a message that fails to encode changes nothing."""
        following = self._table.get((self.state, f"send-{kind}"))
        if following is None:
            raise LocalProtocolError(f"cannot send {kind} in state {self.state}")
        data = pack_message(kind, fields, max_frame=self.max_frame)
        self.state = following
        return data

    @contextlib.contextmanager
    def _receiving(self, what: str) -> Iterator[None]:
        """Wrap ``next_event``: a bad message moves us to ERROR, for good."""
        if self.state == ERROR:
            raise RemoteProtocolError("the peer already broke the protocol on this stream")
        try:
            with peer_input(what):
                yield
        except RemoteProtocolError:
            self.state = ERROR
            raise

    def _next_message(self) -> tuple[str, dict[str, Any]] | None:
        frame = self._decoder.next_frame()
        if frame is None:
            if self._eof and self._decoder.pending_bytes:
                raise RemoteProtocolError("the stream ended inside a frame")
            if self._eof and self.state not in self._eof_states:
                raise RemoteProtocolError(f"the stream ended in state {self.state}")
            return None
        message = decode_map(frame, "message", max_size=self.max_frame)
        kind = field(message, "kind", str)
        self._transition(kind)
        return kind, message
