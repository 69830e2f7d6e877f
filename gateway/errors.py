"""Errors of the gateway: one that becomes an OpenAI-format HTTP error, one for bad setup."""

from __future__ import annotations

from typing import Any

from modelnet.errors import ModelNetError

# OpenAI's error ``type`` for each status we answer with (the official client picks its
# exception class from the status alone; the type is for humans and other clients).
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class GatewayError(ModelNetError):
    """Base of gateway errors."""


class ListenError(GatewayError):
    """The gateway cannot or must not listen as asked: beyond loopback without API keys, a
    bad address or key file, a port already taken."""


class ApiError(GatewayError):
    """An answer in OpenAI's error format: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param

    @property
    def type(self) -> str:
        return ERROR_TYPES.get(self.status, "api_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """A 400: the request is at fault."""
    return ApiError(400, message, param=param, code=code)
