"""Errors of the identity layer: keys, peer ids, keystores, signed records."""

from modelnet.errors import ModelNetError


class IdentityError(ModelNetError):
    """Base of identity errors."""


class MalformedKey(IdentityError):
    """Bytes that are not a key of a kind we accept."""


class InvalidPeerId(IdentityError):
    """Text or bytes that are not a libp2p Ed25519 peer id."""


class InvalidSignature(IdentityError):
    """A signature that does not verify."""


class MalformedRecord(IdentityError):
    """A signed record that does not decode or misses a field."""


class RecordExpired(IdentityError):
    """A signed record past its expiry."""


class WrongKey(IdentityError):
    """A record signed by a key other than the one it claims."""


class WrongDomain(IdentityError):
    """A record signed for another domain or type (no cross-protocol replay)."""


class KeystoreError(IdentityError):
    """A keystore file that is missing, unreadable, too open, or wrongly decrypted."""


class CanonicalEncodingError(IdentityError):
    """A value that has no canonical encoding (unsupported type, non-str key, out of range)."""
