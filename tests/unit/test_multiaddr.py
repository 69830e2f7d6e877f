"""Binary multiaddrs: canonical round trips, byte-for-byte agreement with the `multiaddr`
package libp2p uses, and typed errors for every bad input."""

import hashlib

import multiaddr as pymultiaddr
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelnet.identity import PrivateKey
from modelnet.identity.keys import b58encode
from modelnet.protocols.errors import LocalProtocolError, RemoteProtocolError
from modelnet.protocols.framing import encode_uvarint
from modelnet.protocols.multiaddr import (
    MAX_ADDR_SIZE,
    MAX_DOMAIN_SIZE,
    MAX_MULTIHASH_SIZE,
    from_bytes,
    split_peer,
    to_bytes,
)

PEER = str(PrivateKey.from_seed(bytes(range(32))).peer_id)
SHA256_PEER = b58encode(b"\x12\x20" + hashlib.sha256(b"rsa key").digest())  # an RSA-style Qm… id


@pytest.mark.parametrize(
    "text",
    [
        "/ip4/127.0.0.1/tcp/4001",
        "/ip4/0.0.0.0/udp/0/quic-v1",
        "/ip6/::1/tcp/65535/tls/ws",
        "/ip6/2001:db8::8a2e:370:7334/udp/9/quic",
        "/ip6zone/eth0/ip6/fe80::1/tcp/1",
        "/dns/example.com/tcp/443/wss",
        "/dns4/a.b/tcp/1/noise",
        "/dns6/x.y/udp/1/webrtc-direct",
        "/dnsaddr/bootstrap.libp2p.io",
        "/ip4/1.2.3.4/udp/1/quic-v1/webtransport",
        "/ip4/1.2.3.4/tcp/1/http",
        "/ip4/1.2.3.4/tcp/443/tls/sni/example.com/http",
        "/ip4/1.2.3.4/sctp/5/utp",
        "/memory/0",
        "/memory/18446744073709551615",
        f"/p2p/{PEER}",
        f"/p2p/{SHA256_PEER}",
        f"/ip4/1.2.3.4/tcp/1/p2p/{PEER}/p2p-circuit/p2p/{SHA256_PEER}",
    ],
)
def test_known_addresses_match_the_multiaddr_package(text):
    data = to_bytes(text)
    assert data == pymultiaddr.Multiaddr(text).to_bytes()
    assert from_bytes(data) == text


def test_exact_bytes_of_a_tcp_address():
    # code 4, 127.0.0.1, code 6, port 4001 big-endian
    assert to_bytes("/ip4/127.0.0.1/tcp/4001") == bytes.fromhex("047f000001060fa1")
    # memory: code 777 as a two-byte varint, then a big-endian u64 (rust-libp2p's layout)
    assert to_bytes("/memory/1234") == bytes.fromhex("890600000000000004d2")


@pytest.mark.parametrize(
    "text, canonical",
    [
        ("/ip4/1.2.3.4/tcp/080", "/ip4/1.2.3.4/tcp/80"),
        ("/ip4/1.2.3.4/tcp/80/", "/ip4/1.2.3.4/tcp/80"),
        ("/ip6/0:0:0:0:0:0:0:1/tcp/1", "/ip6/::1/tcp/1"),
        ("/ip6/2001:DB8::1/tcp/1", "/ip6/2001:db8::1/tcp/1"),
        (f"/ipfs/{PEER}", f"/p2p/{PEER}"),
        ("/memory/007", "/memory/7"),
    ],
)
def test_text_is_canonicalised(text, canonical):
    assert from_bytes(to_bytes(text)) == canonical


@pytest.mark.parametrize(
    "text",
    [
        "",
        "/",
        "//",
        "ip4/1.2.3.4",
        "/ip4",
        "/ip4/",
        "/ip4/256.0.0.1",
        "/ip4/01.2.3.4",
        "/ip4/1.2.3",
        "/ip6/fe80::1%eth0",
        "/ip6/1.2.3.4",
        "/tcp/65536",
        "/tcp/-1",
        "/tcp/+1",
        "/tcp/ 1",
        "/tcp/1_0",
        "/tcp/\u0661",
        "/tcp/0x10",
        "/tcp/123456",
        "/memory/18446744073709551616",
        "/dns//tcp/1",
        "/dns4/\ud800",
        "/p2p/",
        "/p2p/0OIl",
        "/p2p/11111",
        "/p2p/" + b58encode(b"\x12\x20" + bytes(31)),
        "/foo/1",
        "/ip4/1.2.3.4//tcp/1",
        "/ip4/1.2.3.4/tcp/1//",
    ],
)
def test_bad_text_is_a_local_error(text):
    with pytest.raises(LocalProtocolError):
        to_bytes(text)


def test_non_string_is_a_local_error():
    with pytest.raises(LocalProtocolError):
        to_bytes(b"/ip4/1.2.3.4")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "hexdata",
    [
        "",
        "04",  # ip4 without its value
        "047f0000",  # ip4 value truncated
        "047f000001060f",  # port truncated
        "8480",  # code varint ends early
        "7f",  # unknown code 127
        "8400",  # code 4 in a padded (non-minimal) varint
        "047f00000186000fa1",  # tcp code padded
        "3505616263",  # dns value longer than the data
        "3503612f62",  # dns value with a '/'
        "3500",  # empty dns value
        "3502ffff",  # dns value not UTF-8
        "a50300",  # empty p2p value
        "a50303122001",  # multihash claims 32 digest bytes, has 1
        "a503021280",  # multihash length varint cut short
        "ffffffffffffffffffffff01",  # varint past 10 bytes
    ],
)
def test_bad_bytes_are_a_remote_error(hexdata):
    with pytest.raises(RemoteProtocolError):
        from_bytes(bytes.fromhex(hexdata))


def test_any_multihash_is_a_p2p_value():
    blake = b"\xa0\xe4\x02\x20" + bytes(32)  # blake2b-256: a two-byte code varint
    text = f"/p2p/{b58encode(blake)}"
    assert to_bytes(text) == b"\xa5\x03\x24" + blake
    assert from_bytes(to_bytes(text)) == text


@pytest.mark.parametrize(
    "text, expected",
    [
        (f"/ip4/1.2.3.4/tcp/1/p2p/{PEER}", ("/ip4/1.2.3.4/tcp/1", PEER)),
        (f"/ip4/1.2.3.4/tcp/1/ipfs/{PEER}", ("/ip4/1.2.3.4/tcp/1", PEER)),
        ("/ip4/1.2.3.4/tcp/1", ("/ip4/1.2.3.4/tcp/1", None)),
        (f"/p2p/{PEER}", ("", PEER)),
        (
            f"/ip4/1.2.3.4/tcp/1/p2p/{SHA256_PEER}/p2p-circuit/p2p/{PEER}",
            (f"/ip4/1.2.3.4/tcp/1/p2p/{SHA256_PEER}/p2p-circuit", PEER),
        ),
        (f"/ip4/1.2.3.4/tcp/1/p2p/{PEER}/p2p-circuit", (f"/ip4/1.2.3.4/tcp/1/p2p/{PEER}/p2p-circuit", None)),
    ],
)
def test_split_peer(text, expected):
    assert split_peer(text) == expected


@pytest.mark.parametrize("text", ["", "/ip4/1.2.3.4/tcp/x", "/ip4/1.2.3.4/tcp/1/p2p/0OIl"])
def test_split_peer_rejects_bad_text(text):
    with pytest.raises(LocalProtocolError):
        split_peer(text)


# ---- properties ------------------------------------------------------------------------

_port = st.integers(0, 65535).map(str)
_domain = st.one_of(
    st.from_regex(r"[a-z0-9]{1,8}(\.[a-z0-9]{1,8}){0,2}", fullmatch=True),
    st.just(".".join(["d" * 63] * 3 + ["d" * 61])),  # 253 bytes: the longest the multiaddr package takes
)
_multihash = st.one_of(
    st.binary(min_size=1, max_size=42).map(lambda d: bytes([0, len(d)]) + d),
    st.binary(min_size=32, max_size=32).map(lambda d: b"\x12\x20" + d),
)
_COMPONENT = st.one_of(
    st.ip_addresses(v=4).map(lambda a: f"/ip4/{a}"),
    st.ip_addresses(v=6).map(lambda a: f"/ip6/{a}"),
    st.sampled_from(["tcp", "udp", "dccp", "sctp"]).flatmap(lambda n: _port.map(lambda p: f"/{n}/{p}")),
    st.sampled_from(["dns", "dns4", "dns6", "dnsaddr", "sni"]).flatmap(lambda n: _domain.map(lambda d: f"/{n}/{d}")),
    _multihash.map(lambda mh: f"/p2p/{b58encode(mh)}"),
    st.integers(0, 2**64 - 1).map(lambda n: f"/memory/{n}"),
    st.sampled_from(
        ["/quic", "/quic-v1", "/ws", "/wss", "/tls", "/noise", "/p2p-circuit", "/webtransport", "/http", "/https"]
    ),
)
_ADDRESS = st.lists(_COMPONENT, min_size=1, max_size=6).map("".join)


@settings(max_examples=300)
@given(_ADDRESS)
def test_generated_addresses_round_trip_and_match_the_multiaddr_package(text):
    reference = pymultiaddr.Multiaddr(text).to_bytes()
    if len(reference) > MAX_ADDR_SIZE:  # valid multiaddr, but more than one peer may send us
        with pytest.raises(LocalProtocolError):
            to_bytes(text)
        return
    data = to_bytes(text)
    assert data == reference
    canonical = from_bytes(data)
    assert to_bytes(canonical) == data
    assert from_bytes(to_bytes(canonical)) == canonical


def _mutations(data: bytes):
    return st.one_of(
        st.just(data),
        st.integers(0, len(data)).map(lambda n: data[:n]),
        st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)).map(
            lambda t: data[: t[0]] + bytes([t[1]]) + data[t[0] + 1 :]
        ),
        st.binary(max_size=8).map(lambda tail: data + tail),
    )


def _fits(text: str) -> bool:
    # up to six components of 255-byte domains can exceed MAX_ADDR_SIZE: not an address
    try:
        to_bytes(text)
    except LocalProtocolError:
        return False
    return True


_BYTES = st.one_of(st.binary(max_size=64), _ADDRESS.filter(_fits).map(to_bytes).flatmap(_mutations))


@settings(max_examples=500)
@given(_BYTES)
def test_any_bytes_decode_to_an_error_or_a_canonical_address(data):
    try:
        text = from_bytes(data)
    except RemoteProtocolError:
        return
    # only one encoding per address: re-encoding gives back the very same bytes
    assert to_bytes(text) == data
    assert from_bytes(to_bytes(text)) == text


@settings(max_examples=300)
@given(st.one_of(st.text(max_size=40), st.text(alphabet="/ip46tcudpnsx0123456789.:", max_size=40), _ADDRESS))
def test_any_text_encodes_to_an_error_or_round_trips(text):
    try:
        data = to_bytes(text)
    except LocalProtocolError:
        return
    assert to_bytes(from_bytes(data)) == data


# ---- size caps (review finding 1: base58 of a huge /p2p/ value froze the event loop) --------


def _p2p(digest_size: int) -> bytes:
    multihash = b"\x00" + encode_uvarint(digest_size) + b"\x07" * digest_size
    return encode_uvarint(421) + encode_uvarint(len(multihash)) + multihash


def _dns(size: int) -> bytes:
    return b"\x36" + encode_uvarint(size) + b"a" * size


_FLAGS = b"\xa2\x02"  # /p2p-circuit, two bytes each


@pytest.mark.parametrize(
    "data, ok",
    [
        (_p2p(MAX_MULTIHASH_SIZE - 2), True),  # a 64-byte multihash
        (_p2p(MAX_MULTIHASH_SIZE - 1), False),
        (_p2p(60_000), False),
        (_dns(MAX_DOMAIN_SIZE), True),
        (_dns(MAX_DOMAIN_SIZE + 1), False),
        (b"\x2a" + encode_uvarint(MAX_DOMAIN_SIZE + 1) + b"z" * (MAX_DOMAIN_SIZE + 1), False),  # ip6zone
        (_FLAGS * (MAX_ADDR_SIZE // 2), True),
        (_FLAGS * (MAX_ADDR_SIZE // 2) + b"\x06\x00\x01", False),
    ],
)
def test_size_caps_both_ways(data, ok):
    if ok:
        assert to_bytes(from_bytes(data)) == data
        return
    with pytest.raises(RemoteProtocolError):
        from_bytes(data)
    try:
        text = pymultiaddr.Multiaddr(data).__str__()  # the multiaddr package has no caps
    except Exception:  # it refuses some of these itself
        return
    with pytest.raises(LocalProtocolError):
        to_bytes(text)


@pytest.mark.parametrize(
    "text",
    [
        "/p2p/" + "z" * 89,  # past the base58 length of 64 bytes: refused before decoding
        "/p2p/" + "z" * 88,  # 66 bytes once decoded
        "/p2p/" + "z" * 500_000,
        "/dns4/" + "a" * (MAX_DOMAIN_SIZE + 1),
        "/sni/" + "é" * 128,  # 256 bytes in UTF-8
        "/p2p-circuit" * (MAX_ADDR_SIZE // 2 + 1),
        "/" + "a" * 100_000,
    ],
)
def test_oversized_text_is_a_local_error(text):
    with pytest.raises(LocalProtocolError):
        to_bytes(text)
