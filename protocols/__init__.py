"""Wire messages and sans-IO state machines: bytes in, events out; no I/O, no clock reads,
no randomness drawn (time, nonces and ids are the caller's parameters: same inputs, same bytes).

- :mod:`.framing` — varint length-prefixed frames;
- :mod:`.messages` — canonical msgpack messages, field checks, the shared endpoint;
- :mod:`.capability` — capability records and their DHT keys and validator;
- :mod:`.session` — ``/modelnet/session/1.0.0``;
- :mod:`.reason` — ``/modelnet/reason/1.0.0``;
- :mod:`.plan` — collaborative plans: the tree, its forms, the run state machine, traces.
"""

from .errors import FrameTooLarge, LocalProtocolError, ProtocolError, RemoteProtocolError

__all__ = ["FrameTooLarge", "LocalProtocolError", "ProtocolError", "RemoteProtocolError"]
