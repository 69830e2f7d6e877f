"""Errors of the gateway: one that becomes an OpenAI-format HTTP error, one for bad setup."""

from __future__ import annotations

from typing import Any

from modelnet.errors import ModelNetError

# OpenAI's error ``type`` for each status we answer with (the official client picks its
# exception class from the status alone; the type is for humans and other clients).
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
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
    """An answer in OpenAI's error format: ``{"error": {"message", "type", "param", "code"}}``,
    with a ``modelnet`` object beside ``error`` when there is more to say (a failed plan's trace)."""

    def __init__(
        self, status: int, message: str, *, code: str | None = None, param: str | None = None,
        extension: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.extension = extension

    @property
    def type(self) -> str:
        return ERROR_TYPES.get(self.status, "api_error")

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        if self.extension is not None:
            body["modelnet"] = self.extension
        return body


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """A 400: the request is at fault."""
    return ApiError(400, message, param=param, code=code)
