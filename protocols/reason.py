"""``/modelnet/reason/1.0.0``: one reasoning request and its answer, on one stream.

::

    client                                      server
      request {request_id, capability, input, params, budget, hop_limit,
               visited, grant, model}  ->
                                        <-  chunk {seq, text}        (0, 1, 2, … optional)
                                        <-  result {output, model, usage, receipt,
                                                    queue, capacity, via}
                                        <-  or error {code, message, retryable}

Each message is one frame holding a canonical msgpack map with a ``kind``. The result's
receipt is a provider-signed record (type ``receipt``) committing to the request id, the
capability, the model, and SHA-256 digests of the input text, of the canonical encoding of
the params (:func:`params_digest`), of the chunk sequence streamed before the result
(:class:`ChunkDigest`: every text, length-prefixed, in order) and of the canonical encoding
of the output (:func:`output_digest`). So what a user watched stream, the parameters the
model ran with and the final output are all the provider's signed word: a forwarder that
alters any of them is caught by the asker's :class:`ReasonClient`, which also requires the
receipt's model to be the one the request named, if it named one. The chunk digest is the
general check (it holds for any output type; it does not claim that the chunks concatenate
to the output, which is the model's business). Cancelling is resetting the stream; there
is no message for it. The server may answer a malformed request with an error before closing.

Deadlines travel as a *budget*: the seconds left when the request was sent. Each hop
starts its own clock when the request arrives and forwards what is left of it, so two
machines never compare wall clocks (skew cannot expire or extend a request); transit time
is not subtracted, so a budget errs long by one one-way delay per hop. ``hop_limit`` is
the number of hops the request may still take, this one included: 0 is refused, and a
forwarder sends ``hop_limit - 1``. ``visited`` lists every peer the request passed through.

A result reports the provider's load (``queue`` requests in progress of ``capacity``), which
askers rank by, and ``via``: the forward statements of the forwarders between the asker and
the provider (:mod:`.forward`), empty for a direct answer.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Iterable

from modelnet.identity import CanonicalEncodingError, PeerID, PrivateKey, SignedRecord, canonical

from . import forward
from .capability import DOMAIN, normalize_tag
from .errors import LocalProtocolError, RemoteProtocolError
from .messages import (
    AWAITING_ANSWER,
    DONE,
    ERROR,
    IDLE,
    INT64_MAX,
    Endpoint,
    check_bool,
    check_bytes,
    check_code,
    check_float,
    check_int,
    check_str,
    check_tuple,
    decode_map,
    field,
    peer_input,
    set_field,
)

REASON_PROTOCOL = "/modelnet/reason/1.0.0"
RECEIPT_TYPE = "receipt"
RECEIPT_TTL = 30 * 24 * 3600.0  # receipts are evidence for accounting; they outlive sessions
REQUEST_ID_BYTES = 16
MAX_BUDGET = 86400.0  # seconds: a day is longer than any request should live
MAX_CAPACITY = (1 << 31) - 1
MAX_INPUT_BYTES = 1 << 20
MAX_TEXT_BYTES = 1 << 20  # one chunk
MAX_HOP_LIMIT = 32
MAX_VISITED = 32
MAX_PARAMS = 32
MAX_PARAM_KEY_CHARS = 64
MAX_PARAM_STR_CHARS = 4096
MAX_GRANT_BYTES = 16 << 10
MAX_RECEIPT_BYTES = 16 << 10
MAX_MODEL_CHARS = 128
MAX_MESSAGE_CHARS = 4096
MAX_OUTPUT_DEPTH = 8
REASON_MAX_FRAME = 2 << 20  # a request with 1 MiB of input and all its params fits

# error codes
NO_SUCH_CAPABILITY = "no-such-capability"
INVALID_INPUT = "invalid-input"
DEADLINE_EXCEEDED = "deadline-exceeded"
HOP_LIMIT = "hop-limit"
LOOP = "loop"
UNAUTHORIZED = "unauthorized"
OVERLOADED = "overloaded"
INTERNAL = "internal"
CANCELLED = "cancelled"
ERROR_CODES = frozenset(
    {
        NO_SUCH_CAPABILITY,
        INVALID_INPUT,
        DEADLINE_EXCEEDED,
        HOP_LIMIT,
        LOOP,
        UNAUTHORIZED,
        OVERLOADED,
        INTERNAL,
        CANCELLED,
    }
)

Param = str | int | float | bool | None


def _check_params(params: Any) -> dict[str, Param]:
    if not isinstance(params, dict) or len(params) > MAX_PARAMS:
        raise LocalProtocolError(f"params must be a map of at most {MAX_PARAMS} entries")
    for key, value in params.items():
        check_str("param name", key, min_len=1, max_len=MAX_PARAM_KEY_CHARS)
        if isinstance(value, str):
            check_str(f"param {key!r}", value, max_len=MAX_PARAM_STR_CHARS)
        elif isinstance(value, float):
            check_float(f"param {key!r}", value)
        elif isinstance(value, int) and not isinstance(value, bool):
            check_int(f"param {key!r}", value, -INT64_MAX - 1, INT64_MAX)
        elif value is not None and not isinstance(value, bool):
            raise LocalProtocolError(f"param {key!r} must be a str, int, float, bool or None")
    return dict(params)


@dataclasses.dataclass(frozen=True, slots=True)
class Request:
    request_id: bytes  # 16 random bytes
    capability: str  # normalized tag
    input: str  # at most 1 MiB of UTF-8
    params: dict[str, Param]
    budget: float  # seconds left when sent, 0..MAX_BUDGET
    hop_limit: int  # hops the request may still take, this one included, 0..32
    visited: tuple[PeerID, ...] = ()  # peers the request has passed through (loop detection)
    grant: bytes | None = None  # an encoded session grant
    model: str | None = None  # a specific model, or any that matches

    def __post_init__(self) -> None:
        check_bytes("request id", self.request_id, min_len=REQUEST_ID_BYTES, max_len=REQUEST_ID_BYTES)
        set_field(self, "capability", normalize_tag(self.capability))
        check_str("input", self.input, max_len=MAX_INPUT_BYTES, utf8=True)
        set_field(self, "params", _check_params(self.params))
        set_field(self, "budget", check_float("budget", self.budget, lo=0.0, hi=MAX_BUDGET))
        check_int("hop_limit", self.hop_limit, 0, MAX_HOP_LIMIT)
        visited = check_tuple("visited", self.visited, max_len=MAX_VISITED)
        if not all(isinstance(peer, PeerID) for peer in visited):
            raise LocalProtocolError("visited must hold PeerIDs")
        set_field(self, "visited", visited)
        if self.grant is not None:
            check_bytes("grant", self.grant, max_len=MAX_GRANT_BYTES)
        if self.model is not None:
            check_str("model", self.model, min_len=1, max_len=MAX_MODEL_CHARS)

    def _to_wire(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "capability": self.capability,
            "input": self.input,
            "params": self.params,
            "budget": self.budget,
            "hop_limit": self.hop_limit,
            "visited": [peer.bytes for peer in self.visited],
            "grant": self.grant,
            "model": self.model,
        }

    @classmethod
    def _from_wire(cls, fields: dict[str, Any]) -> "Request":
        visited = field(fields, "visited", list, [])
        if len(visited) > MAX_VISITED:
            raise RemoteProtocolError(f"visited lists more than {MAX_VISITED} peers")
        return cls(
            request_id=field(fields, "request_id", bytes),
            capability=field(fields, "capability", str),
            input=field(fields, "input", str),
            params=field(fields, "params", dict, {}),
            budget=field(fields, "budget", (int, float)),
            hop_limit=field(fields, "hop_limit", int),
            visited=tuple(PeerID.from_bytes(check_bytes("visited peer", peer, max_len=64)) for peer in visited),
            grant=field(fields, "grant", (bytes, type(None)), None),
            model=field(fields, "model", (str, type(None)), None),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Chunk:
    seq: int  # 0, 1, 2, … within one answer
    text: str

    def __post_init__(self) -> None:
        check_int("chunk seq", self.seq, 0, INT64_MAX)
        check_str("chunk text", self.text, max_len=MAX_TEXT_BYTES, utf8=True)


@dataclasses.dataclass(frozen=True, slots=True)
class Usage:
    input_bytes: int
    output_bytes: int
    compute_ms: float

    def __post_init__(self) -> None:
        check_int("input_bytes", self.input_bytes, 0, INT64_MAX)
        check_int("output_bytes", self.output_bytes, 0, INT64_MAX)
        set_field(self, "compute_ms", check_float("compute_ms", self.compute_ms, lo=0.0))


@dataclasses.dataclass(frozen=True, slots=True)
class Result:
    output: Any  # str/int/float/bool/None/bytes/list/dict (str keys), nested at most 8 deep
    model: str
    usage: Usage
    receipt: bytes  # an encoded SignedRecord of type "receipt"
    queue: int = 0  # requests the answering node has in progress...
    capacity: int = 0  # ...of this many it takes at once (0: not reported)
    via: tuple[bytes, ...] = ()  # forward statements, the asker's end first

    def __post_init__(self) -> None:
        encode_output(self.output)  # raises LocalProtocolError for what can't be sent
        check_str("model", self.model, min_len=1, max_len=MAX_MODEL_CHARS)
        if not isinstance(self.usage, Usage):
            raise LocalProtocolError("usage must be Usage")
        check_bytes("receipt", self.receipt, min_len=1, max_len=MAX_RECEIPT_BYTES)
        check_int("queue", self.queue, 0, MAX_CAPACITY)
        check_int("capacity", self.capacity, 0, MAX_CAPACITY)
        via = check_tuple("via", self.via, max_len=forward.MAX_ROUTE)
        for statement in via:
            check_bytes("forward statement", statement, min_len=1, max_len=forward.MAX_STATEMENT_BYTES)
        set_field(self, "via", via)

    @property
    def load(self) -> float | None:
        """``queue / capacity``, or None if the provider did not say."""
        return self.queue / self.capacity if self.capacity else None


@dataclasses.dataclass(frozen=True, slots=True)
class Error:
    code: str  # one of ERROR_CODES when we send; peers may send codes we don't know yet
    message: str
    retryable: bool

    def __post_init__(self) -> None:
        check_code("error code", self.code)
        check_str("error message", self.message, max_len=MAX_MESSAGE_CHARS)
        check_bool("retryable", self.retryable)


@dataclasses.dataclass(frozen=True, slots=True)
class Receipt:
    request_id: bytes
    capability: str
    model: str
    input_sha256: bytes
    output_sha256: bytes
    provider: PeerID
    client: PeerID
    issued: float
    params_sha256: bytes  # params_digest(request.params)
    chunks_sha256: bytes  # ChunkDigest of the chunks streamed before the result

    def __post_init__(self) -> None:
        check_bytes("request id", self.request_id, min_len=REQUEST_ID_BYTES, max_len=REQUEST_ID_BYTES)
        set_field(self, "capability", normalize_tag(self.capability))
        check_str("model", self.model, min_len=1, max_len=MAX_MODEL_CHARS)
        for name in ("input_sha256", "output_sha256", "params_sha256", "chunks_sha256"):
            check_bytes(name, getattr(self, name), min_len=32, max_len=32)
        if not isinstance(self.provider, PeerID) or not isinstance(self.client, PeerID):
            raise LocalProtocolError("receipt provider and client must be PeerIDs")
        set_field(self, "issued", check_float("issued", self.issued))


def encode_output(output: Any) -> bytes:
    """The canonical encoding of a result's output: what a receipt's digest is taken of."""
    try:
        return canonical.encode(output, max_depth=MAX_OUTPUT_DEPTH)
    except CanonicalEncodingError as exc:
        raise LocalProtocolError(f"output: {exc}") from None


def output_digest(output: Any) -> bytes:
    """SHA-256 of the canonical encoding of ``output``: what a receipt commits to."""
    return hashlib.sha256(encode_output(output)).digest()


def input_digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def params_digest(params: dict[str, Param]) -> bytes:
    """SHA-256 of the canonical encoding of a request's params: what a receipt commits to."""
    return hashlib.sha256(canonical.encode(params)).digest()


class ChunkDigest:
    """SHA-256 over a chunk sequence as it streams: each text's UTF-8 bytes prefixed by their
    length (8 bytes, big-endian), so the split into chunks is committed too, not only the
    concatenation. A receipt commits to ``digest()`` of the chunks sent before the result."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()

    def update(self, text: str) -> None:
        data = text.encode("utf-8")
        self._hash.update(len(data).to_bytes(8, "big") + data)

    def digest(self) -> bytes:
        return self._hash.copy().digest()


def chunks_digest(texts: Iterable[str]) -> bytes:
    """:class:`ChunkDigest` of a whole chunk sequence."""
    digest = ChunkDigest()
    for text in texts:
        digest.update(text)
    return digest.digest()


def make_receipt(
    key: PrivateKey,
    *,
    request: Request,
    client: PeerID,
    model: str,
    output_bytes: bytes,
    chunks_sha256: bytes,
    now: float,
) -> bytes:
    """A signed receipt for answering ``request`` from ``client``.

    ``output_bytes`` is ``encode_output(output)`` of the result's output (not its digest):
    the receipt commits to its SHA-256, which equals ``output_digest(output)``.
    ``chunks_sha256`` is the :class:`ChunkDigest` of the chunks streamed before the result
    (:attr:`ReasonServer.streamed` keeps it).
    """
    check_bytes("output_bytes", output_bytes, max_len=REASON_MAX_FRAME)
    receipt = Receipt(
        request_id=request.request_id,
        capability=request.capability,
        model=model,
        input_sha256=input_digest(request.input),
        output_sha256=hashlib.sha256(output_bytes).digest(),
        provider=key.peer_id,
        client=client,
        issued=now,
        params_sha256=params_digest(request.params),
        chunks_sha256=chunks_sha256,
    )
    payload = canonical.encode(
        {
            "request_id": receipt.request_id,
            "capability": receipt.capability,
            "model": receipt.model,
            "input_sha256": receipt.input_sha256,
            "output_sha256": receipt.output_sha256,
            "params_sha256": receipt.params_sha256,
            "chunks_sha256": receipt.chunks_sha256,
            "client": receipt.client.bytes,
            "issued": receipt.issued,
        }
    )
    record = SignedRecord.sign(
        key, domain=DOMAIN, type=RECEIPT_TYPE, payload=payload, seq=0, expires=receipt.issued + RECEIPT_TTL
    )
    return record.encode()


def open_receipt(data: bytes, *, provider: PeerID, now: float | None = None) -> Receipt:
    """Verify a receipt signed by ``provider`` (and unexpired at ``now``, if given).

    Raises identity errors for a bad record, :class:`RemoteProtocolError` for a bad payload.
    """
    record = SignedRecord.decode(data)
    if now is None:
        record.verify_signature(domain=DOMAIN, type=RECEIPT_TYPE, signer=provider)
    else:
        record.verify(now=now, domain=DOMAIN, type=RECEIPT_TYPE, signer=provider)
    with peer_input("receipt"):
        fields = decode_map(record.payload, "receipt")
        return Receipt(
            request_id=field(fields, "request_id", bytes),
            capability=field(fields, "capability", str),
            model=field(fields, "model", str),
            input_sha256=field(fields, "input_sha256", bytes),
            output_sha256=field(fields, "output_sha256", bytes),
            provider=record.signer,
            client=PeerID.from_bytes(field(fields, "client", bytes)),
            issued=field(fields, "issued", (int, float)),
            params_sha256=field(fields, "params_sha256", bytes),
            chunks_sha256=field(fields, "chunks_sha256", bytes),
        )


# states, besides the shared IDLE, AWAITING_ANSWER, DONE and ERROR
AWAITING_REQUEST = "awaiting-request"
RESPONDING = "responding"

# (state, event) -> next state; "send-x" is us sending x, a bare kind is the peer's message
_TRANSITIONS = {
    # client
    (IDLE, "send-request"): AWAITING_ANSWER,
    (AWAITING_ANSWER, "chunk"): AWAITING_ANSWER,
    (AWAITING_ANSWER, "result"): DONE,
    (AWAITING_ANSWER, "error"): DONE,
    # server
    (AWAITING_REQUEST, "request"): RESPONDING,
    (RESPONDING, "send-chunk"): RESPONDING,
    (RESPONDING, "send-result"): DONE,
    (RESPONDING, "send-error"): DONE,
    (AWAITING_REQUEST, "send-error"): DONE,  # e.g. overloaded before reading the request
    (ERROR, "send-error"): DONE,  # answer a malformed request with INVALID_INPUT
}


def _usage_from_wire(fields: dict[str, Any]) -> Usage:
    return Usage(
        input_bytes=field(fields, "input_bytes", int),
        output_bytes=field(fields, "output_bytes", int),
        compute_ms=field(fields, "compute_ms", (int, float)),
    )


class ReasonClient(Endpoint):
    """Send one request; receive chunks, then a result or an error.

    With ``provider`` (the peer the request is sent to) given, a result's receipt must
    match the request (id, capability, input, params, and model when the request named
    one), the chunks received and the output, and be signed by ``provider`` and issued to
    ``client`` (when given) -- or, when the result came through forwarders, be vouched for
    by a chain of forward statements from ``provider`` to the receipt's signer
    (:func:`.forward.check_route`; then ``client`` is required). ``route`` and
    ``answered_by`` tell who forwarded and who answered. Without ``provider`` the receipt
    is passed on unread.
    """

    def __init__(self, *, provider: PeerID | None = None, client: PeerID | None = None) -> None:
        super().__init__(_TRANSITIONS, IDLE, eof_states=frozenset({DONE}), max_frame=REASON_MAX_FRAME)
        self.provider = provider
        self.client = client
        self.request: Request | None = None
        self.route: tuple[PeerID, ...] = ()  # forwarders, once a result is checked
        self.answered_by: PeerID | None = provider
        self._next_chunk = 0
        self._streamed = ChunkDigest()  # of the chunks received, for the receipt check

    def send_request(self, request: Request) -> bytes:
        if not isinstance(request, Request):
            raise LocalProtocolError("send_request takes a Request")
        data = self._pack("request", request._to_wire())
        self.request = request
        return data

    def next_event(self) -> Chunk | Result | Error | None:
        with self._receiving("reason answer"):
            message = self._next_message()
            if message is None:
                return None
            kind, fields = message
            if kind == "chunk":
                chunk = Chunk(seq=field(fields, "seq", int), text=field(fields, "text", str))
                if chunk.seq != self._next_chunk:
                    raise RemoteProtocolError(f"chunk {chunk.seq} arrived, expected {self._next_chunk}")
                self._next_chunk += 1
                self._streamed.update(chunk.text)
                return chunk
            if kind == "error":
                return Error(
                    code=field(fields, "code", str),
                    message=field(fields, "message", str, ""),
                    retryable=field(fields, "retryable", bool, False),
                )
            if "output" not in fields:
                raise RemoteProtocolError("result misses the field 'output'")
            result = Result(
                output=fields["output"],
                model=field(fields, "model", str),
                usage=_usage_from_wire(field(fields, "usage", dict)),
                receipt=field(fields, "receipt", bytes),
                queue=field(fields, "queue", int, 0),
                capacity=field(fields, "capacity", int, 0),
                via=tuple(field(fields, "via", list, [])),
            )
            if self.provider is not None:
                self._check_receipt(result)
            return result

    def _check_receipt(self, result: Result) -> None:
        assert self.request is not None and self.provider is not None  # the table allows a result only after our request
        provider, client = self.provider, self.client
        if result.via:
            if self.client is None:
                raise LocalProtocolError("checking a forwarded answer needs the asker's peer id")
            route, provider = forward.check_route(
                result.via, request_id=self.request.request_id, asker=self.client, first_hop=self.provider, receipt=result.receipt
            )
            client = route[-1]
            self.route = route
        receipt = open_receipt(result.receipt, provider=provider)
        self.answered_by = provider
        expected = (self.request.request_id, self.request.capability, result.model, output_digest(result.output))
        if (receipt.request_id, receipt.capability, receipt.model, receipt.output_sha256) != expected:
            raise RemoteProtocolError("the receipt does not match the request, model or output")
        if receipt.input_sha256 != input_digest(self.request.input):
            raise RemoteProtocolError("the receipt commits to another input")
        if receipt.params_sha256 != params_digest(self.request.params):
            raise RemoteProtocolError("the receipt commits to other params")
        if receipt.chunks_sha256 != self._streamed.digest():
            raise RemoteProtocolError("the chunks received are not the ones the receipt commits to")
        if self.request.model is not None and receipt.model != self.request.model:
            raise RemoteProtocolError(f"asked for model {self.request.model!r}, answered by {receipt.model!r}")
        if client is not None and receipt.client != client:
            raise RemoteProtocolError("the receipt was issued to another asker")


class ReasonServer(Endpoint):
    """Receive one request; send chunks, then a result or an error."""

    def __init__(self) -> None:
        super().__init__(
            _TRANSITIONS, AWAITING_REQUEST, eof_states=frozenset({RESPONDING, DONE}), max_frame=REASON_MAX_FRAME
        )
        self.request: Request | None = None
        self._next_chunk = 0
        self.streamed = ChunkDigest()  # of the chunks sent: what the receipt commits to

    def next_event(self) -> Request | None:
        with self._receiving("reason request"):
            message = self._next_message()
            if message is None:
                return None
            self.request = Request._from_wire(message[1])
            return self.request

    def send(self, event: Chunk | Result | Error) -> bytes:
        """Frame an answer; :class:`LocalProtocolError` if it is out of order or invalid."""
        if isinstance(event, Chunk):
            if event.seq != self._next_chunk:
                raise LocalProtocolError(f"chunk {event.seq} sent, expected {self._next_chunk}")
            data = self._pack("chunk", {"seq": event.seq, "text": event.text})
            self._next_chunk += 1
            self.streamed.update(event.text)
            return data
        if isinstance(event, Result):
            usage = dataclasses.asdict(event.usage)
            fields = {
                "output": event.output,
                "model": event.model,
                "usage": usage,
                "receipt": event.receipt,
                "queue": event.queue,
                "capacity": event.capacity,
                "via": list(event.via),
            }
            return self._pack("result", fields)
        if isinstance(event, Error):
            check_code("error code", event.code, ERROR_CODES)
            fields = {"code": event.code, "message": event.message, "retryable": event.retryable}
            return self._pack("error", fields)
        raise LocalProtocolError(f"cannot send {type(event).__name__}")
