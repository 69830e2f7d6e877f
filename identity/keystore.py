"""Key files: one Ed25519 key per JSON file, optionally sealed with a passphrase.

Plain::

    {"version": 1, "type": "ed25519", "peer_id": "12D3KooW…", "seed": "<base64>"}

With a passphrase, ``seed`` is replaced by::

    "kdf": {"name": "scrypt", "n": 16384, "r": 8, "p": 1, "salt": "<base64>"},
    "cipher": {"name": "chacha20-poly1305", "nonce": "<base64>", "ciphertext": "<base64>"}

The peer id is the AEAD's associated data, so a file cannot be re-labelled. Files are
written atomically (temp file + rename) and are never, even briefly, readable by others.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import stat
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from .errors import InvalidPeerId, KeystoreError, MalformedKey
from .keys import PeerID, PrivateKey

KEYSTORE_VERSION = 1
KEY_TYPE = "ed25519"
DEFAULT_SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
# bounds on parameters read from a file, so a crafted file can't demand gigabytes of memory
_SCRYPT_N_RANGE = (2**10, 2**18)
_SCRYPT_RP_MAX = 16
_SCRYPT_MAX_MEMORY = 256 << 20  # scrypt needs 128 * n * r bytes
_SALT_BYTES = 16
_NONCE_BYTES = 12

PathLike = str | os.PathLike[str]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: Any, what: str, path: Path) -> bytes:
    if not isinstance(value, str):
        raise KeystoreError(f"key file {path} is corrupt: {what} is not base64 text")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise KeystoreError(f"key file {path} is corrupt: {what} is not base64") from None


def _derive(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase.encode("utf-8"))


def _document(key: PrivateKey, passphrase: str | None, scrypt_n: int) -> dict[str, Any]:
    peer_id = str(key.peer_id)
    doc: dict[str, Any] = {"version": KEYSTORE_VERSION, "type": KEY_TYPE, "peer_id": peer_id}
    if passphrase is None:
        doc["seed"] = _b64(key.seed)
        return doc
    if not _SCRYPT_N_RANGE[0] <= scrypt_n <= _SCRYPT_N_RANGE[1] or scrypt_n & (scrypt_n - 1):
        raise KeystoreError(f"scrypt n must be a power of two in {_SCRYPT_N_RANGE}")
    salt, nonce = os.urandom(_SALT_BYTES), os.urandom(_NONCE_BYTES)
    sealing_key = _derive(passphrase, salt, scrypt_n, SCRYPT_R, SCRYPT_P)
    ciphertext = ChaCha20Poly1305(sealing_key).encrypt(nonce, key.seed, peer_id.encode("utf-8"))
    doc["kdf"] = {"name": "scrypt", "n": scrypt_n, "r": SCRYPT_R, "p": SCRYPT_P, "salt": _b64(salt)}
    doc["cipher"] = {"name": "chacha20-poly1305", "nonce": _b64(nonce), "ciphertext": _b64(ciphertext)}
    return doc


def _write_private(path: Path, text: str, *, replace: bool) -> None:
    """Write ``text`` to ``path`` atomically with mode 0600.

    With ``replace=False`` an existing file wins (FileExistsError), so two processes
    creating the same key file never clobber each other's key.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    # O_EXCL + mode 0600 at creation: the file is never, even briefly, wider than 0600
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), 0o600)  # the umask may have narrowed it past owner-read
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


def save_key(
    path: PathLike, key: PrivateKey, passphrase: str | None = None, *, scrypt_n: int = DEFAULT_SCRYPT_N
) -> None:
    """Write ``key`` to ``path`` (replacing any file there), sealed if ``passphrase`` is given."""
    path = Path(path)
    text = json.dumps(_document(key, passphrase, scrypt_n), indent=2) + "\n"
    try:
        _write_private(path, text, replace=True)
    except OSError as exc:
        raise KeystoreError(f"cannot write key file {path}: {exc.strerror or exc}") from None


MAX_KEY_FILE_BYTES = 64 << 10  # a key file is a few hundred bytes


def _read(path: Path) -> dict[str, Any]:
    # Open first, then check the very file we opened (fstat), so the file cannot be
    # swapped between the permission check and the read; never follow a symlink.
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise KeystoreError(f"no key file at {path}") from None
    except OSError as exc:
        raise KeystoreError(f"cannot read key file {path}: {exc.strerror or exc}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise KeystoreError(f"key file {path} is not a regular file")
    with os.fdopen(fd, "rb") as file:
        if info.st_mode & 0o077:
            raise KeystoreError(
                f"key file {path} is readable by group or others (mode {stat.S_IMODE(info.st_mode):o}); "
                f"run `chmod 600 {path}`"
            )
        try:
            data = file.read(MAX_KEY_FILE_BYTES + 1)
        except OSError as exc:
            raise KeystoreError(f"cannot read key file {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise KeystoreError(f"key file {path} is corrupt: larger than {MAX_KEY_FILE_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise KeystoreError(f"key file {path} is corrupt: not UTF-8 text") from None
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        raise KeystoreError(f"key file {path} is corrupt: not JSON") from None
    if not isinstance(doc, dict):
        raise KeystoreError(f"key file {path} is corrupt: not a JSON object")
    return doc


def _section(doc: dict[str, Any], name: str, path: Path) -> dict[str, Any]:
    section = doc.get(name)
    if not isinstance(section, dict):
        raise KeystoreError(f"key file {path} is corrupt: no {name!r} section")
    return section


def _unseal(doc: dict[str, Any], passphrase: str | None, path: Path, peer_id: str) -> bytes:
    if passphrase is None:
        raise KeystoreError(f"key file {path} is encrypted; a passphrase is needed")
    kdf, cipher = _section(doc, "kdf", path), _section(doc, "cipher", path)
    if kdf.get("name") != "scrypt" or cipher.get("name") != "chacha20-poly1305":
        raise KeystoreError(f"key file {path} uses an unsupported kdf or cipher")
    n, r, p = kdf.get("n"), kdf.get("r"), kdf.get("p")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (n, r, p)) or not (
        _SCRYPT_N_RANGE[0] <= n <= _SCRYPT_N_RANGE[1]
        and n & (n - 1) == 0
        and 1 <= r <= _SCRYPT_RP_MAX
        and 1 <= p <= _SCRYPT_RP_MAX
        and 128 * n * r <= _SCRYPT_MAX_MEMORY
    ):
        raise KeystoreError(f"key file {path} has scrypt parameters out of range")
    salt = _unb64(kdf.get("salt"), "salt", path)
    nonce = _unb64(cipher.get("nonce"), "nonce", path)
    ciphertext = _unb64(cipher.get("ciphertext"), "ciphertext", path)
    if len(nonce) != _NONCE_BYTES:
        raise KeystoreError(f"key file {path} is corrupt: nonce is not {_NONCE_BYTES} bytes")
    sealing_key = _derive(passphrase, salt, n, r, p)
    try:
        return ChaCha20Poly1305(sealing_key).decrypt(nonce, ciphertext, peer_id.encode("utf-8"))
    except InvalidTag:
        raise KeystoreError(f"wrong passphrase for key file {path} (or the file was altered)") from None


def load_key(path: PathLike, passphrase: str | None = None) -> PrivateKey:
    """Read a key file; :class:`KeystoreError` with a message a user can act on."""
    path = Path(path)
    doc = _read(path)
    version = doc.get("version")
    if version != KEYSTORE_VERSION or isinstance(version, bool):
        raise KeystoreError(
            f"key file {path} has version {version!r}; this modelnet reads version {KEYSTORE_VERSION}"
        )
    if doc.get("type") != KEY_TYPE:
        raise KeystoreError(f"key file {path} holds a {doc.get('type')!r} key; only {KEY_TYPE!r} is supported")
    peer_id = doc.get("peer_id")
    if not isinstance(peer_id, str):
        raise KeystoreError(f"key file {path} is corrupt: no peer id")
    if "seed" in doc:
        seed = _unb64(doc["seed"], "seed", path)
    else:
        seed = _unseal(doc, passphrase, path, peer_id)
    try:
        key = PrivateKey.from_seed(seed)
    except MalformedKey:
        raise KeystoreError(f"key file {path} is corrupt: the seed is not 32 bytes") from None
    try:
        expected = PeerID.from_base58(peer_id)
    except InvalidPeerId:
        expected = None
    if key.peer_id != expected:
        raise KeystoreError(
            f"key file {path} names peer {peer_id} but holds the key of {key.peer_id}; "
            "the file was edited or is corrupt"
        )
    return key


def _make_private_dirs(directory: Path) -> None:
    # os.makedirs gives only the leaf its mode; every directory we create must be 0700
    missing = []
    while not directory.exists():
        missing.append(directory)
        if directory.parent == directory:
            break
        directory = directory.parent
    for item in reversed(missing):
        try:
            os.mkdir(item, 0o700)
        except FileExistsError:
            pass


def load_or_create_key(
    path: PathLike, passphrase: str | None = None, *, scrypt_n: int = DEFAULT_SCRYPT_N
) -> tuple[PrivateKey, bool]:
    """Load the key at ``path``, or create one there. Returns ``(key, created)``."""
    path = Path(path)
    if os.path.lexists(path):
        return load_key(path, passphrase), False
    key = PrivateKey.generate()
    text = json.dumps(_document(key, passphrase, scrypt_n), indent=2) + "\n"
    try:
        _make_private_dirs(path.parent)
        _write_private(path, text, replace=False)
    except FileExistsError:
        return load_key(path, passphrase), False  # another process created it first
    except OSError as exc:
        raise KeystoreError(f"cannot create key file {path}: {exc.strerror or exc}") from None
    return key, True
