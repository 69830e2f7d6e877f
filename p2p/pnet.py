"""Private swarms: a pre-shared key that closes a swarm to everyone who lacks it (libp2p pnet).

What goes on the wire is libp2p's "Private Networks PSK v1", as go-libp2p and kubo speak
it: each side of a raw TCP connection first sends a random 24-byte nonce, then everything
it writes, from the multistream header of the security handshake on, is XSalsa20 with the
shared 32-byte key and its own nonce. A node without the key, or with another one, reads
noise where it expects ``/multistream/1.0.0`` and the connection dies before Noise starts,
so a stranger learns nothing of the swarm, not even its peer ids.

(py-libp2p ships a ``pnet`` too, but with Salsa20 and an 8-byte nonce: it speaks to no
other implementation. This one is the spec's; :mod:`.libp2p_host` installs it.)

The key file is go-ipfs's ``swarm.key``::

    /key/swarm/psk/1.0.0/
    /base16/
    <64 hex digits>

(``/base64/`` and ``/bin/`` encodings are read too; ``/base16/`` is written.) Key files are
secrets: written mode 0600, and refused when group- or world-readable, like node keys.

No libp2p import here: the CLI writes and checks key files without loading the network.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import os
import secrets
import stat
import struct
from pathlib import Path

from Crypto.Cipher import Salsa20

from .errors import DialError, P2PError

KEY_BYTES = 32
NONCE_BYTES = 24
HEADER = "/key/swarm/psk/1.0.0/"
ENCODINGS = ("/base16/", "/base64/", "/bin/")
MAX_KEY_FILE_BYTES = 4096


class SwarmKeyError(P2PError):
    """A swarm key file that is missing, unreadable, too open or not a key."""


class SwarmMismatch(DialError):
    """The peer is not in our swarm: it holds another swarm key, or one of us has none."""


@dataclasses.dataclass(frozen=True, slots=True)
class SwarmKey:
    """The 32-byte pre-shared key of a private swarm."""

    secret: bytes = dataclasses.field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.secret, bytes) or len(self.secret) != KEY_BYTES:
            raise SwarmKeyError(f"a swarm key is {KEY_BYTES} bytes")

    @classmethod
    def generate(cls) -> "SwarmKey":
        return cls(secrets.token_bytes(KEY_BYTES))

    @property
    def fingerprint(self) -> str:
        """A short public name of the key, for logs and messages (the key stays secret)."""
        return hashlib.sha256(b"modelnet-swarm-key-fingerprint\0" + self.secret).hexdigest()[:12]

    def encode(self) -> bytes:
        """The key file's text (``/base16/``)."""
        return f"{HEADER}\n/base16/\n{self.secret.hex()}\n".encode("ascii")

    @classmethod
    def decode(cls, data: bytes) -> "SwarmKey":
        """Parse a key file's bytes; :class:`SwarmKeyError` says what is wrong."""
        if not isinstance(data, bytes) or len(data) > MAX_KEY_FILE_BYTES:
            raise SwarmKeyError(f"a swarm key file is at most {MAX_KEY_FILE_BYTES} bytes")
        header, _, rest = data.partition(b"\n")
        if header.strip() != HEADER.encode():
            raise SwarmKeyError(f"not a swarm key: the first line must be {HEADER}")
        encoding, _, body = rest.partition(b"\n")
        encoding_text = encoding.strip().decode("ascii", "replace")
        if encoding_text == "/bin/":
            secret = body
        else:
            text = body.strip()
            try:
                if encoding_text == "/base16/":
                    secret = bytes.fromhex(text.decode("ascii"))
                elif encoding_text == "/base64/":
                    secret = base64.b64decode(text, validate=True)
                else:
                    raise SwarmKeyError(f"unknown swarm key encoding {encoding_text[:32]!r}; one of {', '.join(ENCODINGS)}")
            except (ValueError, UnicodeDecodeError, binascii.Error):
                raise SwarmKeyError(f"the swarm key is not valid {encoding_text.strip('/')}") from None
        if len(secret) != KEY_BYTES:
            raise SwarmKeyError(f"a swarm key is {KEY_BYTES} bytes, this one {len(secret)}")
        return cls(secret)


def load_swarm_key(path: str | os.PathLike[str]) -> SwarmKey:
    """Read a key file; :class:`SwarmKeyError` if missing, readable by others, or malformed."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise SwarmKeyError(f"cannot read swarm key {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as file:
        mode = os.fstat(file.fileno()).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SwarmKeyError(f"swarm key {path} is readable by others (mode {stat.S_IMODE(mode):o}); chmod 600 it")
        data = file.read(MAX_KEY_FILE_BYTES + 1)
    try:
        return SwarmKey.decode(data)
    except SwarmKeyError as exc:
        raise SwarmKeyError(f"{path}: {exc}") from None


def write_swarm_key(path: str | os.PathLike[str], key: SwarmKey) -> None:
    """Write a new key file, mode 0600; :class:`SwarmKeyError` if the file exists."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise SwarmKeyError(f"{path} exists; a swarm key is never overwritten") from None
    except OSError as exc:
        raise SwarmKeyError(f"cannot write swarm key {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "wb") as file:
        file.write(key.encode())


# ---- telling a stranger apart, fast -------------------------------------------------------

# Whatever the peer sends first on a libp2p connection, once pnet is peeled off, opens the
# security negotiation: multistream-select's header. Checking those 20 bytes turns a key
# mismatch into an error at the first packet instead of a handshake that waits for a
# garbage-sized message until the dial times out.
MULTISTREAM_HEADER = b"\x13/multistream/1.0.0\n"


class HandshakeCheck:
    """Sans-IO: judges the peer's first bytes on a raw connection (``key`` is ours or None).

    :meth:`nonce` takes the 24 raw bytes a pnet peer sends first (keyed side only),
    :meth:`feed` the bytes after them as the handshake sees them (decrypted when keyed),
    :meth:`ended` an end of stream; each raises :class:`SwarmMismatch` naming the likely
    cause. Once the header has been seen, nothing more is checked.
    """

    __slots__ = ("key", "_seen", "done")

    def __init__(self, key: SwarmKey | None) -> None:
        self.key = key
        self._seen = 0
        self.done = False

    def _ours(self) -> str:
        return f"our swarm key {self.key.fingerprint}" if self.key else "we have no swarm key"

    def nonce(self, raw: bytes) -> None:
        if raw.startswith(MULTISTREAM_HEADER[: len(raw)]):
            raise SwarmMismatch(f"the peer is not in a private swarm (it sent a plain libp2p handshake; {self._ours()})")

    def feed(self, data: bytes) -> None:
        if self.done or not data:
            return
        expected = MULTISTREAM_HEADER[self._seen : self._seen + len(data)]
        if data[: len(expected)] != expected:
            self.done = True
            if self.key is None:
                raise SwarmMismatch(
                    "the peer's handshake is not plain libp2p: it is likely in a private swarm "
                    "(connect with its --swarm-key FILE)"
                )
            raise SwarmMismatch(f"the peer's handshake does not decrypt under {self._ours()}: it holds another swarm key")
        self._seen += len(expected)
        self.done = self._seen == len(MULTISTREAM_HEADER)

    def ended(self) -> None:
        if self.done:
            return
        self.done = True
        if self.key is None:
            raise SwarmMismatch(
                "the peer closed the connection during the handshake: it may be in a private swarm "
                "(then connect with its --swarm-key FILE)"
            )
        raise SwarmMismatch(
            f"the peer closed the connection during the handshake: it likely holds another swarm key, or none ({self._ours()})"
        )


# ---- XSalsa20 ------------------------------------------------------------------------------


def _rotl(value: int, shift: int) -> int:
    return ((value << shift) & 0xFFFFFFFF) | (value >> (32 - shift))


def hsalsa20(key: bytes, nonce: bytes) -> bytes:
    """The HSalsa20 core (32-byte key, 16-byte nonce): XSalsa20's per-nonce subkey.

    pycryptodome has Salsa20 with 8-byte nonces only; this runs once per connection.
    """
    words = [0x61707865, *struct.unpack("<4I", key[:16]), 0x3320646E, *struct.unpack("<4I", nonce),
             0x79622D32, *struct.unpack("<4I", key[16:]), 0x6B206574]  # fmt: skip
    x = words

    def quarter(a: int, b: int, c: int, d: int) -> None:
        x[b] ^= _rotl((x[a] + x[d]) & 0xFFFFFFFF, 7)
        x[c] ^= _rotl((x[b] + x[a]) & 0xFFFFFFFF, 9)
        x[d] ^= _rotl((x[c] + x[b]) & 0xFFFFFFFF, 13)
        x[a] ^= _rotl((x[d] + x[c]) & 0xFFFFFFFF, 18)

    for _ in range(10):
        quarter(0, 4, 8, 12), quarter(5, 9, 13, 1), quarter(10, 14, 2, 6), quarter(15, 3, 7, 11)
        quarter(0, 1, 2, 3), quarter(5, 6, 7, 4), quarter(10, 11, 8, 9), quarter(15, 12, 13, 14)
    return struct.pack("<8I", x[0], x[5], x[10], x[15], x[6], x[7], x[8], x[9])


class XSalsa20:
    """One direction of a pnet connection: XOR with the XSalsa20 keystream, in order."""

    __slots__ = ("_cipher",)

    def __init__(self, key: SwarmKey, nonce: bytes) -> None:
        if len(nonce) != NONCE_BYTES:
            raise SwarmKeyError(f"a pnet nonce is {NONCE_BYTES} bytes")
        self._cipher = Salsa20.new(key=hsalsa20(key.secret, nonce[:16]), nonce=nonce[16:])

    def apply(self, data: bytes) -> bytes:
        return self._cipher.encrypt(data) if data else b""
