"""Tier 1: swarm key files and the pnet cipher (p2p/pnet.py), without the network."""

from __future__ import annotations

import base64
import os

import nacl.secret
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelnet.p2p import pnet

KEY = pnet.SwarmKey(bytes(range(32)))


def test_key_file_round_trip_and_go_ipfs_format():
    text = KEY.encode()
    assert text == b"/key/swarm/psk/1.0.0/\n/base16/\n" + bytes(range(32)).hex().encode() + b"\n"
    assert pnet.SwarmKey.decode(text) == KEY
    # what go-ipfs users write by hand: base64 and raw bytes, CRLF line ends
    assert pnet.SwarmKey.decode(b"/key/swarm/psk/1.0.0/\r\n/base64/\r\n" + base64.b64encode(KEY.secret) + b"\r\n") == KEY
    assert pnet.SwarmKey.decode(b"/key/swarm/psk/1.0.0/\n/bin/\n" + KEY.secret) == KEY
    assert "secret" not in repr(KEY) and KEY.secret.hex() not in repr(KEY)
    assert len(KEY.fingerprint) == 12 and KEY.fingerprint not in KEY.secret.hex()


@pytest.mark.parametrize(
    "data, why",
    [
        (b"", "first line"),
        (b"/key/swarm/psk/2.0.0/\n/base16/\n" + b"00" * 32, "first line"),
        (b"/key/swarm/psk/1.0.0/\n/base32/\nAAAA", "unknown swarm key encoding"),
        (b"/key/swarm/psk/1.0.0/\n/base16/\n" + b"zz" * 32, "not valid base16"),
        (b"/key/swarm/psk/1.0.0/\n/base16/\n" + b"00" * 31, "32 bytes, this one 31"),
        (b"/key/swarm/psk/1.0.0/\n/base64/\n!!!!", "not valid base64"),
        (b"x" * 5000, "at most"),
    ],
)
def test_bad_key_files_say_what_is_wrong(data, why):
    with pytest.raises(pnet.SwarmKeyError, match=why):
        pnet.SwarmKey.decode(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_are_a_key_or_a_typed_error(data):
    try:
        key = pnet.SwarmKey.decode(b"/key/swarm/psk/1.0.0/\n/base16/\n" + data)
    except pnet.SwarmKeyError:
        return
    assert len(key.secret) == 32


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300))
def test_any_file_is_a_key_or_a_typed_error(data):
    try:
        pnet.SwarmKey.decode(data)
    except pnet.SwarmKeyError:
        pass


def test_write_then_load_with_permissions(tmp_path):
    path = tmp_path / "swarm.key"
    pnet.write_swarm_key(path, KEY)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert pnet.load_swarm_key(path) == KEY
    with pytest.raises(pnet.SwarmKeyError, match="never overwritten"):
        pnet.write_swarm_key(path, pnet.SwarmKey.generate())
    os.chmod(path, 0o644)
    with pytest.raises(pnet.SwarmKeyError, match="readable by others"):
        pnet.load_swarm_key(path)
    with pytest.raises(pnet.SwarmKeyError, match="cannot read"):
        pnet.load_swarm_key(tmp_path / "missing.key")
    (tmp_path / "bad.key").write_bytes(b"hello")
    os.chmod(tmp_path / "bad.key", 0o600)
    with pytest.raises(pnet.SwarmKeyError, match="bad.key"):
        pnet.load_swarm_key(tmp_path / "bad.key")


def test_xsalsa20_is_the_standard_cipher():
    # libsodium's secretbox is XSalsa20 (+ Poly1305 over the keystream from byte 32 on):
    # the same keystream, so the same bytes as go-libp2p's pnet.
    nonce, message = os.urandom(24), os.urandom(1000)
    box = nacl.secret.SecretBox(KEY.secret).encrypt(message, nonce).ciphertext[16:]
    stream = pnet.XSalsa20(KEY, nonce)
    stream.apply(bytes(32))  # secretbox skips the first 32 keystream bytes (its Poly1305 key)
    ours = b"".join(stream.apply(message[i : i + 77]) for i in range(0, len(message), 77))  # in pieces, as TCP reads
    assert ours == box


class TestHandshakeCheck:
    HEADER = pnet.MULTISTREAM_HEADER

    def test_the_header_in_any_pieces_passes(self):
        check = pnet.HandshakeCheck(KEY)
        for i in range(len(self.HEADER)):
            check.feed(self.HEADER[i : i + 1])
        assert check.done
        check.feed(b"anything after the header")
        check.ended()  # after the header an end of stream is not a mismatch

    def test_garbage_names_the_likely_cause(self):
        with pytest.raises(pnet.SwarmMismatch, match="another swarm key"):
            pnet.HandshakeCheck(KEY).feed(os.urandom(1) + b"garbage")
        with pytest.raises(pnet.SwarmMismatch, match="private swarm"):
            pnet.HandshakeCheck(None).feed(b"\x99garbage")
        with pytest.raises(pnet.SwarmMismatch, match="not in a private swarm"):
            pnet.HandshakeCheck(KEY).nonce(self.HEADER[:10])
        with pytest.raises(pnet.SwarmMismatch, match="closed the connection"):
            pnet.HandshakeCheck(KEY).ended()
        check = pnet.HandshakeCheck(None)
        check.feed(self.HEADER[:5])
        with pytest.raises(pnet.SwarmMismatch, match="--swarm-key"):
            check.ended()
