"""Identity: Ed25519 keys, libp2p peer ids, keystores, canonical encoding, signed records."""

from .errors import (
    IdentityError,
    InvalidPeerId,
    InvalidSignature,
    KeystoreError,
    MalformedKey,
    MalformedRecord,
    RecordExpired,
    WrongDomain,
    WrongKey,
)
from .keys import PeerID, PrivateKey, PublicKey

__all__ = [
    "IdentityError",
    "InvalidPeerId",
    "InvalidSignature",
    "KeystoreError",
    "MalformedKey",
    "MalformedRecord",
    "PeerID",
    "PrivateKey",
    "PublicKey",
    "RecordExpired",
    "WrongDomain",
    "WrongKey",
]
