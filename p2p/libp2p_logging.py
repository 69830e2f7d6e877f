"""py-libp2p's logging, taken over by the libp2p host.

Importing libp2p leaves its ``libp2p`` logger with no handler and propagation off, and
some of its modules log on every normal stream end. Its records at WARNING and above go
to ``modelnet.p2p.libp2p``, where the application's logging configuration decides what
happens to them; those about a dial that fails are demoted to DEBUG, since the caller
gets a DialError for it. This module does not import libp2p: it only names its logger.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from typing import Iterator

_libp2p_log_handler: logging.Handler | None = None
# Set while we dial: libp2p logs a refused or failed dial at ERROR, but the caller gets
# a DialError for it, so those records are demoted to DEBUG rather than said twice.
_dialling: contextvars.ContextVar[bool] = contextvars.ContextVar("modelnet_libp2p_dialling", default=False)


class _ForwardToModelnet(logging.Handler):
    """Hands libp2p's records to ``modelnet.p2p.libp2p``, where the application's
    logging configuration decides what happens to them."""

    def emit(self, record: logging.LogRecord) -> None:
        target = logging.getLogger("modelnet.p2p.libp2p")
        if _dialling.get() and record.levelno > logging.DEBUG:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        if target.isEnabledFor(record.levelno):
            target.handle(record)


def take_over_libp2p_logging(level: int = logging.WARNING) -> None:
    """Route the ``libp2p`` logger into ours at ``level`` (importing libp2p leaves it
    with no handler and propagation off, and some of its modules log on every normal
    stream end). Idempotent; a later call changes the level."""
    global _libp2p_log_handler
    libp2p_logger = logging.getLogger("libp2p")
    libp2p_logger.setLevel(level)
    if _libp2p_log_handler is None:
        _libp2p_log_handler = _ForwardToModelnet()
        libp2p_logger.addHandler(_libp2p_log_handler)
    # on the handler too: some libp2p modules set their own logger to INFO
    _libp2p_log_handler.setLevel(level)


def take_over_libp2p_logging_once() -> None:
    """:func:`take_over_libp2p_logging` at its default level, unless it ran already: a
    host keeps the level the application chose."""
    if _libp2p_log_handler is None:
        take_over_libp2p_logging()


@contextlib.contextmanager
def dialling() -> Iterator[None]:
    """Inside, libp2p's records are demoted to DEBUG (the tasks libp2p starts meanwhile
    inherit it): the dialler reports a failure itself."""
    token = _dialling.set(True)
    try:
        yield
    finally:
        _dialling.reset(token)
