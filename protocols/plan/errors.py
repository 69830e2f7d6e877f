"""The two errors of plans: a plan that is not valid, a trace that does not check out."""

from __future__ import annotations

from ..errors import ProtocolError


class InvalidPlan(ProtocolError):
    """A plan (dict, file or wire bytes) that is not valid; ``path`` names where."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.reason = message


class InvalidTrace(ProtocolError):
    """A trace whose receipts, chaining or decisions do not check out; ``path`` names the step."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.reason = message
