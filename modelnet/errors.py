"""The one error root, and the one place exception groups are unwrapped."""

from __future__ import annotations

import contextlib
from typing import Iterator


class ModelNetError(Exception):
    """Base of every error modelnet raises on purpose."""


def sole_error(group: BaseExceptionGroup) -> BaseException:
    """The error a nursery's group stands for: its only leaf, or the group itself.

    trio nurseries wrap whatever their tasks raise; a caller of ``open_x()`` or of a
    function that uses a nursery inside should see ``NoProvider``, not a group of one.
    """
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    return leaves[0] if len(leaves) == 1 else group


@contextlib.contextmanager
def unwrapping_groups() -> Iterator[None]:
    """Re-raise a group of one error as that error (its traceback kept)."""
    try:
        yield
    except BaseExceptionGroup as group:
        error = sole_error(group)
        if error is group:
            raise
        raise error from None
