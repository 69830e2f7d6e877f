"""What stands between HTTP and the gateway's endpoints: browsers kept out, bodies bounded,
requests counted, and a request's work cancelled when its client goes away.

Browsers. A gateway on loopback without keys is reachable by any web page its user
opens: a cross-site "simple" request (a ``text/plain`` POST) runs blind, and DNS
rebinding (a page whose name resolves to 127.0.0.1) can even read the answers. So every
request must name the gateway in ``Host`` (the bound host, ``localhost``/``127.0.0.1``/
``[::1]`` when bound to loopback, any IP literal when bound to every interface: rebinding
needs a DNS name; and ``Config.allowed_hosts``), must carry no ``Origin`` but the
gateway's own (there is no CORS), and a POST must be ``Content-Type: application/json``,
which a browser cannot send cross-site without a preflight that we do not answer. The
official clients send ``Host: 127.0.0.1:PORT`` and JSON, and no ``Origin``.

Disconnects. The body is read whole first (at most ``Config.max_body_bytes``), then the
endpoint runs under a cancel scope that a watcher of the connection cancels when the
client disconnects: routed work stops, hop after hop, whether or not the answer streams.

Load. At most ``Config.max_concurrent_requests`` requests are handled at once; one more is
answered 429 with ``Retry-After`` at once rather than queued (a queue would hold sockets
and hide overload; OpenAI's clients retry a 429 after a back-off).
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any
from urllib.parse import urlsplit

import trio

from . import openai_api as api
from .config import Config, is_loopback
from .errors import ApiError

logger = logging.getLogger(__name__)

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARDS = frozenset({"0.0.0.0", "::", ""})
RETRY_AFTER_SECONDS = 1


class Guard:
    """ASGI middleware around the gateway's app (see the module's doc)."""

    def __init__(self, app: Any, config: Config) -> None:
        self.app = app
        self.config = config
        self.limiter = trio.CapacityLimiter(config.max_concurrent_requests)
        bound = config.host.strip("[]").lower()
        self.hosts = frozenset({bound, *(h.strip("[]").lower().rstrip(".") for h in config.allowed_hosts)})
        if is_loopback(bound):
            self.hosts |= LOOPBACK_NAMES
        self.any_ip = bound in WILDCARDS

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":  # lifespan
            await self.app(scope, receive, send)
            return
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        try:
            self.check_browser(scope["method"], headers)
        except ApiError as exc:
            logger.info("refused %s %s: %s", scope["method"], scope["path"], exc)
            await send_error(send, exc)
            return
        token = object()
        try:
            self.limiter.acquire_on_behalf_of_nowait(token)
        except trio.WouldBlock:
            busy = ApiError(429, f"the gateway is handling {self.limiter.total_tokens} requests: retry shortly", code="gateway_busy")
            await send_error(send, busy, [(b"retry-after", str(RETRY_AFTER_SECONDS).encode())])
            return
        try:
            await self._handle(scope, receive, send, headers)
        finally:
            self.limiter.release_on_behalf_of(token)

    def check_browser(self, method: str, headers: dict[str, str]) -> None:
        """Refuse what only a browser led by another site would send (ApiError)."""
        host = headers.get("host", "")
        if not self.host_allowed(host):
            raise ApiError(400, f"the Host header {host!r} does not name this gateway", code="invalid_host")
        origin = headers.get("origin")
        if origin is not None and urlsplit(origin).netloc.lower() != host.lower():
            raise ApiError(403, f"cross-origin requests are refused (Origin {origin!r}); this gateway has no CORS", code="forbidden_origin")
        if method == "POST":
            media_type = headers.get("content-type", "").partition(";")[0].strip().lower()
            if media_type != "application/json":
                raise ApiError(
                    415, f"send the body as JSON with 'Content-Type: application/json' (not {media_type or 'none'!r})",
                    code="unsupported_media_type",
                )  # fmt: skip

    def host_allowed(self, host: str) -> bool:
        name = host.lower()
        if name.startswith("["):  # [v6]:port
            name = name[1 : name.find("]")] if "]" in name else ""
        else:
            name = name.rpartition(":")[0] if ":" in name else name
        name = name.rstrip(".")
        if not name:
            return False
        if name in self.hosts:
            return True
        if self.any_ip:
            try:
                ipaddress.ip_address(name)
            except ValueError:
                return False
            return True
        return False

    async def _handle(self, scope, receive, send, headers: dict[str, str]) -> None:
        body = await self._read_body(receive, send, headers)
        if body is None:
            return
        gone = trio.Event()
        delivered = False

        async def replay() -> dict[str, Any]:
            # The endpoint reads the body we already hold, then waits for the end.
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def watch(cancel_scope: trio.CancelScope) -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            logger.info("the client of %s %s disconnected: cancelling its request", scope["method"], scope["path"])
            gone.set()
            cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch, nursery.cancel_scope)
            await self.app(scope, replay, send)
            nursery.cancel_scope.cancel()  # answered: stop watching

    async def _read_body(self, receive, send, headers: dict[str, str]) -> bytes | None:
        """The whole body, a 413 sent (None) past the limit, or None if the client left."""
        limit = self.config.max_body_bytes
        too_large = ApiError(413, f"the request body exceeds {limit} bytes")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await send_error(send, too_large)
            return None
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > limit:
                await send_error(send, too_large)
                return None
            if not message.get("more_body", False):
                return bytes(body)


async def send_error(send, error: ApiError, headers: list[tuple[bytes, bytes]] = ()) -> None:
    """``error`` as a whole ASGI response in OpenAI's format."""
    data = api.dumps(error.body())
    start = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *headers]
    await send({"type": "http.response.start", "status": error.status, "headers": start})
    await send({"type": "http.response.body", "body": data, "more_body": False})
