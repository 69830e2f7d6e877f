"""Model backends behind one small interface; the embedded default models; echo for tests."""

from .base import Backend, Chunk, InvalidInput, ModelError, ModelInfo, Output, UnknownModel
from .embedded import EchoBackend, EmbeddedBackend
from .registry import load_backends

__all__ = [
    "Backend",
    "Chunk",
    "EchoBackend",
    "EmbeddedBackend",
    "InvalidInput",
    "ModelError",
    "ModelInfo",
    "Output",
    "UnknownModel",
    "load_backends",
]
