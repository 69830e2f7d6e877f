"""The one error root. Each package defines a few flat subclasses of it."""


class ModelNetError(Exception):
    """Base of every error modelnet raises on purpose."""
