"""The gateway's knobs, its API keys, and the rule that keys guard any non-loopback listener."""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
import logging
import os
import stat
from pathlib import Path

from .catalog import DISCOVERY_TAGS
from .errors import ListenError

logger = logging.getLogger(__name__)

MAX_KEY_FILE_BYTES = 64 << 10
MIN_KEY_CHARS = 16


@dataclasses.dataclass(frozen=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 8080  # 0: any free port (the bound URL is what ``Gateway.serve`` starts with)
    api_keys: frozenset[str] = frozenset()  # Bearer keys; none: open, which only loopback allows
    request_timeout: float | None = None  # default deadline of a routed request (None: the node's)
    discovery_tags: tuple[str, ...] = DISCOVERY_TAGS  # tags /v1/models looks up
    catalog_ttl: float = 30.0  # /v1/models is rebuilt at most this often
    lookup_timeout: float = 5.0  # bound of one discovery lookup
    max_body_bytes: int = 4 << 20
    max_parallel_embeddings: int = 8  # inputs of one /v1/embeddings request routed at once
    max_concurrent_requests: int = 64  # HTTP requests handled at once; beyond: 429 (see .guard)
    allowed_hosts: tuple[str, ...] = ()  # more names clients may use in Host (a proxy's, a DNS name)
    # Let clients use what only the node's authority reaches: models it serves under a
    # non-public policy, and (routed) its organisations' private models. Off: requests are
    # answered as an anonymous peer's would be (see docs/gateway.md).
    serve_private: bool = False

    def __post_init__(self) -> None:
        check_listen(self.host, self.api_keys)
        if not 0 <= self.port <= 65535:
            raise ListenError(f"port {self.port} is not in 0..65535")
        if self.max_concurrent_requests < 1:
            raise ListenError("max_concurrent_requests must be at least 1")

    def key_matches(self, presented: str) -> bool:
        """Whether ``presented`` is one of our keys (constant time in each comparison)."""
        found = False
        for key in self.api_keys:
            found |= hmac.compare_digest(key.encode(), presented.encode())
        return found


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_listen(host: str, api_keys: frozenset[str]) -> None:
    """Refuse to serve beyond loopback without keys: anyone who reaches the port could
    spend the network's models in this node's name."""
    if not is_loopback(host) and not api_keys:
        raise ListenError(
            f"refusing to serve the HTTP gateway on {host} without API keys: "
            "anyone who can reach it could use the network in this node's name; "
            "pass --api-key-file FILE (one key per line) or listen on 127.0.0.1"
        )


def parse_http_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6) into its parts, or :class:`ListenError`."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ListenError(f"--http wants HOST:PORT (e.g. 127.0.0.1:8080), not {text!r}")
    return host, int(port)


def load_api_keys(path: str | os.PathLike) -> frozenset[str]:
    """Keys from a file, one per line; blank lines and ``#`` comments are skipped."""
    path = Path(path)
    try:
        with path.open("rb") as file:
            mode = os.fstat(file.fileno()).st_mode
            data = file.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise ListenError(f"cannot read the API key file {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise ListenError(f"the API key file {path} is larger than {MAX_KEY_FILE_BYTES} bytes")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("the API key file %s is readable by other users (chmod 600 it)", path)
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise ListenError(f"the API key file {path} is not UTF-8 text") from None
    keys = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    for number, key in enumerate(keys, 1):
        if len(key) < MIN_KEY_CHARS or any(c.isspace() for c in key) or not key.isprintable():
            raise ListenError(
                f"API key {number} in {path} must be at least {MIN_KEY_CHARS} printable characters without spaces"
            )
    if not keys:
        raise ListenError(f"the API key file {path} holds no key")
    return frozenset(keys)
