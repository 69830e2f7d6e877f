"""Multiaddrs in text and in the multiformats binary form.

Binary: for each component, the protocol code as an unsigned varint, then its value: a
fixed number of bytes, nothing, or (variable-size protocols) a varint length and the bytes.
Text: ``/name/value/name/...``. Both forms are canonical here: a text that parses always
prints back the same way after a trip through bytes, and bytes that parse are the only
encoding of their text (varints must be minimal), so decoded addresses compare equal
byte-for-byte with go-, rust- and js-libp2p's.

The protocol table is the subset of the multiformats table that libp2p peers advertise;
an unknown code cannot be skipped (its value size is unknown), so it fails the address.

Sizes are capped in both directions (MAX_* below): addresses arrive from any peer in DHT
answers, and an uncapped ``/p2p/`` value reaches base58, whose cost grows with the square
of its length (a 60 KB value froze the event loop for seconds).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from typing import Callable

from modelnet.identity import IdentityError
from modelnet.identity.keys import b58decode, b58encode

from .errors import LocalProtocolError, RemoteProtocolError
from .framing import decode_uvarint, encode_uvarint

MAX_ADDR_SIZE = 1024
"""Bytes of one binary multiaddr; real ones are under 100 (a DNS name and a peer id fit)."""
MAX_MULTIHASH_SIZE = 64
"""Bytes of a ``/p2p/`` value: an Ed25519 identity multihash is 38, a sha2-256 one 34."""
MAX_DOMAIN_SIZE = 255
"""Bytes of a dns/dns4/dns6/dnsaddr/sni (and ip6zone) value: the DNS limit on a name."""
_MAX_TEXT_SIZE = 8 * MAX_ADDR_SIZE  # text is at most 7x its binary form (2 B -> "/webrtc-direct")
_B58_MAX_TEXT = 88  # base58 characters of MAX_MULTIHASH_SIZE bytes: ceil(64 * log(256) / log(58))

_VARIABLE = -1  # value size: a varint length prefix, then the bytes
_PORT_TEXT = re.compile(r"[0-9]{1,5}")
_U64_TEXT = re.compile(r"[0-9]{1,20}")


def _read_uvarint(data: bytes, pos: int) -> tuple[int, int]:
    try:
        header = decode_uvarint(data, pos)
    except RemoteProtocolError:
        header = None
    # the multiformats varint spec forbids padding: it would give one address two encodings
    if header is None or (header[1] - pos > 1 and data[header[1] - 1] == 0):
        raise ValueError("truncated, overlong or non-minimal varint")
    return header


def _uint_codec(pattern: re.Pattern[str], size: int) -> tuple[Callable, Callable]:
    def encode(text: str) -> bytes:
        # fullmatch on [0-9]: int() alone would also take "+1", " 1", "1_0" and "١"
        if not pattern.fullmatch(text) or int(text) >> (8 * size):
            raise ValueError(f"{text!r} is not an unsigned {8 * size}-bit integer")
        return int(text).to_bytes(size, "big")

    return encode, lambda data: str(int.from_bytes(data, "big"))


def _ip4_encode(text: str) -> bytes:
    return ipaddress.IPv4Address(text).packed


def _ip6_encode(text: str) -> bytes:
    if "%" in text:  # a zone is its own component (/ip6zone/...), not part of the address
        raise ValueError("IPv6 zone inside an ip6 value")
    return ipaddress.IPv6Address(text).packed


def _utf8_encode(text: str) -> bytes:
    if not text:
        raise ValueError("empty value")
    return text.encode("utf-8")


def _utf8_decode(data: bytes) -> str:
    text = data.decode("utf-8")
    if not text or "/" in text:
        raise ValueError("empty value or a '/' inside a value")
    return text


def _check_multihash(data: bytes) -> bytes:
    _, pos = _read_uvarint(data, 0)  # hash function code: any, peer ids are not only Ed25519
    length, pos = _read_uvarint(data, pos)
    if len(data) - pos != length:
        raise ValueError("multihash digest length does not match its header")
    return data


def _p2p_encode(text: str) -> bytes:
    # checked before base58 runs: decoding is quadratic in the length of the text
    if len(text) > _B58_MAX_TEXT:
        raise ValueError(f"a /p2p/ value over {MAX_MULTIHASH_SIZE} bytes")
    try:
        return _check_multihash(b58decode(text))
    except IdentityError as exc:
        raise ValueError(str(exc)) from None


def _p2p_decode(data: bytes) -> str:
    return b58encode(_check_multihash(data))


_PORT = _uint_codec(_PORT_TEXT, 2)
_DOMAIN = (_utf8_encode, _utf8_decode)
_FLAG = (None, None)


@dataclasses.dataclass(frozen=True, slots=True)
class _Protocol:
    code: int
    name: str
    size: int  # value bytes: 0 (no value), fixed, or _VARIABLE
    encode: Callable[[str], bytes] | None  # text value -> bytes; raises ValueError
    decode: Callable[[bytes], str] | None  # bytes value -> text; raises ValueError
    max_size: int = MAX_ADDR_SIZE  # for a _VARIABLE value


_PROTOCOLS = [
    _Protocol(4, "ip4", 4, _ip4_encode, lambda data: str(ipaddress.IPv4Address(data))),
    _Protocol(6, "tcp", 2, *_PORT),
    _Protocol(33, "dccp", 2, *_PORT),
    _Protocol(41, "ip6", 16, _ip6_encode, lambda data: str(ipaddress.IPv6Address(data))),
    _Protocol(42, "ip6zone", _VARIABLE, *_DOMAIN, MAX_DOMAIN_SIZE),
    _Protocol(53, "dns", _VARIABLE, *_DOMAIN, MAX_DOMAIN_SIZE),
    _Protocol(54, "dns4", _VARIABLE, *_DOMAIN, MAX_DOMAIN_SIZE),
    _Protocol(55, "dns6", _VARIABLE, *_DOMAIN, MAX_DOMAIN_SIZE),
    _Protocol(56, "dnsaddr", _VARIABLE, *_DOMAIN, MAX_DOMAIN_SIZE),
    _Protocol(132, "sctp", 2, *_PORT),
    _Protocol(273, "udp", 2, *_PORT),
    _Protocol(280, "webrtc-direct", 0, *_FLAG),
    _Protocol(281, "webrtc", 0, *_FLAG),
    _Protocol(290, "p2p-circuit", 0, *_FLAG),
    _Protocol(301, "udt", 0, *_FLAG),
    _Protocol(302, "utp", 0, *_FLAG),
    _Protocol(421, "p2p", _VARIABLE, _p2p_encode, _p2p_decode, MAX_MULTIHASH_SIZE),
    _Protocol(443, "https", 0, *_FLAG),
    _Protocol(448, "tls", 0, *_FLAG),
    _Protocol(449, "sni", _VARIABLE, *_DOMAIN, MAX_DOMAIN_SIZE),
    _Protocol(454, "noise", 0, *_FLAG),
    _Protocol(460, "quic", 0, *_FLAG),
    _Protocol(461, "quic-v1", 0, *_FLAG),
    _Protocol(465, "webtransport", 0, *_FLAG),
    _Protocol(477, "ws", 0, *_FLAG),
    _Protocol(478, "wss", 0, *_FLAG),
    _Protocol(480, "http", 0, *_FLAG),
    _Protocol(777, "memory", 8, *_uint_codec(_U64_TEXT, 8)),  # rust-libp2p's in-process transport
]
_BY_CODE = {p.code: p for p in _PROTOCOLS}
_BY_NAME = {p.name: p for p in _PROTOCOLS}
_BY_NAME["ipfs"] = _BY_NAME["p2p"]  # the old name of p2p; printed as /p2p/

_Component = tuple[_Protocol, bytes]


def _parse_text(text: str) -> list[_Component]:
    if not isinstance(text, str) or not text.startswith("/"):
        raise LocalProtocolError(f"a multiaddr starts with '/': {text!r:.80}")
    if len(text) > _MAX_TEXT_SIZE:
        raise LocalProtocolError(f"a multiaddr of {len(text)} characters: {text[:64]!r}…")
    parts = text[1:].split("/")
    if parts[-1] == "":  # one trailing slash is tolerated, as go-multiaddr does
        parts.pop()
    if not parts:
        raise LocalProtocolError("empty multiaddr")
    components = []
    i = 0
    while i < len(parts):
        proto = _BY_NAME.get(parts[i])
        if proto is None:
            raise LocalProtocolError(f"unknown protocol {parts[i]!r} in {text!r}")
        i += 1
        value = b""
        if proto.size:
            if i == len(parts):
                raise LocalProtocolError(f"/{proto.name} needs a value in {text!r}")
            try:
                value = proto.encode(parts[i])
                if proto.size == _VARIABLE and len(value) > proto.max_size:
                    raise ValueError(f"{len(value)} bytes, over the limit of {proto.max_size}")
            except ValueError as exc:
                raise LocalProtocolError(f"bad /{proto.name} value {parts[i]!r:.80}: {exc}") from None
            i += 1
        components.append((proto, value))
    return components


def _format(components: list[_Component]) -> str:
    return "".join(f"/{p.name}/{p.decode(v)}" if p.size else f"/{p.name}" for p, v in components)


def to_bytes(text: str) -> bytes:
    """The binary form of a text multiaddr; :class:`LocalProtocolError` if it is not one."""
    out = bytearray()
    for proto, value in _parse_text(text):
        out += encode_uvarint(proto.code)
        if proto.size == _VARIABLE:
            out += encode_uvarint(len(value))
        out += value
    if len(out) > MAX_ADDR_SIZE:
        raise LocalProtocolError(f"a multiaddr of {len(out)} bytes, over the limit of {MAX_ADDR_SIZE}")
    return bytes(out)


def from_bytes(data: bytes) -> str:
    """The canonical text of a binary multiaddr; :class:`RemoteProtocolError` if invalid."""
    data = bytes(data)
    if not data:
        raise RemoteProtocolError("empty multiaddr")
    if len(data) > MAX_ADDR_SIZE:
        raise RemoteProtocolError(f"a multiaddr of {len(data)} bytes, over the limit of {MAX_ADDR_SIZE}")
    components = []
    pos = 0
    try:
        while pos < len(data):
            code, pos = _read_uvarint(data, pos)
            proto = _BY_CODE.get(code)
            if proto is None:
                raise ValueError(f"unknown protocol code {code}")
            size = proto.size
            if size == _VARIABLE:
                size, pos = _read_uvarint(data, pos)
                if size > proto.max_size:
                    raise ValueError(f"/{proto.name} value of {size} bytes, over the limit of {proto.max_size}")
            if len(data) - pos < size:
                raise ValueError(f"/{proto.name} value truncated")
            components.append((proto, data[pos : pos + size]))
            pos += size
        return _format(components)
    except ValueError as exc:
        raise RemoteProtocolError(f"bad binary multiaddr {data[:64].hex()}: {exc}") from None


def split_peer(text: str) -> tuple[str, str | None]:
    """``("/ip4/…/tcp/…", "12D3KooW…")`` from an address ending in ``/p2p/<id>``.

    The address part comes back canonical and ``""`` if the text was only ``/p2p/<id>``;
    the id is ``None`` when there is no trailing ``/p2p/``. Bad text raises
    :class:`LocalProtocolError`.
    """
    components = _parse_text(text)
    proto, value = components[-1]
    if proto.name != "p2p":
        return _format(components), None
    return _format(components[:-1]), b58encode(value)
