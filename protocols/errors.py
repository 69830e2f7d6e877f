"""Errors of the sans-IO protocol layer.

``LocalProtocolError``: we were asked to send something invalid (our bug or bad user input).
``RemoteProtocolError``: the peer sent something invalid; drop it, log it, carry on.
"""

from modelnet.errors import ModelNetError


class ProtocolError(ModelNetError):
    """Base of protocol errors."""


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes or a message the protocol does not allow."""


class FrameTooLarge(RemoteProtocolError):
    """A length prefix above the frame limit."""
