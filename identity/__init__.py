"""Identity: Ed25519 keys, libp2p peer ids, keystores, canonical encoding, signed records."""

from . import canonical
from .errors import (
    CanonicalEncodingError,
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
from .keystore import load_key, load_or_create_key, save_key
from .records import SignedRecord, open_record

__all__ = [
    "CanonicalEncodingError",
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
    "SignedRecord",
    "WrongDomain",
    "WrongKey",
    "canonical",
    "load_key",
    "load_or_create_key",
    "open_record",
    "save_key",
]
