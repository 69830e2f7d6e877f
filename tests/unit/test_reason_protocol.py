"""The reason protocol: requests, chunks, results with receipts, errors, misuse."""

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelnet.identity import IdentityError, InvalidSignature, PrivateKey, RecordExpired, WrongKey, canonical
from modelnet.protocols import reason
from modelnet.protocols.errors import LocalProtocolError, RemoteProtocolError
from modelnet.protocols.framing import encode_frame
from modelnet.protocols.messages import pack_message
from modelnet.protocols.reason import (
    Chunk,
    Error,
    ReasonClient,
    ReasonServer,
    Receipt,
    Request,
    Result,
    Usage,
    encode_output,
    make_receipt,
    open_receipt,
    output_digest,
)

from .test_identity import canonical_values

CLIENT = PrivateKey.from_seed(b"\x31" * 32)
PROVIDER = PrivateKey.from_seed(b"\x32" * 32)
MALLORY = PrivateKey.from_seed(b"\x33" * 32)
NOW = 1_700_000_000.0
RID = bytes(range(16))
USAGE = Usage(input_bytes=5, output_bytes=11, compute_ms=2.5)
MAX_FRAME = reason.REASON_MAX_FRAME


def request(**changes):
    fields = {
        "request_id": RID,
        "capability": "Chat",
        "input": "hello",
        "params": {"temperature": 0.2, "max_tokens": 64, "stream": True, "stop": None, "style": "terse"},
        "budget": 30.0,
        "hop_limit": 3,
        "visited": (MALLORY.peer_id,),
        "grant": b"grant-bytes",
        "model": "llama",
    }
    return Request(**(fields | changes))


def result_for(req, output="hello world", *, key=PROVIDER, model="llama", client=CLIENT.peer_id, chunks=()):
    """A result for ``req`` whose receipt commits to ``chunks`` streamed before it."""
    receipt = make_receipt(
        key,
        request=req,
        client=client,
        model=model,
        output_bytes=encode_output(output),
        chunks_sha256=reason.chunks_digest(chunks),
        now=NOW,
    )
    return Result(output=output, model=model, usage=USAGE, receipt=receipt)


def connected(provider=PROVIDER.peer_id, req=None):
    client, server = ReasonClient(provider=provider, client=CLIENT.peer_id), ReasonServer()
    server.receive_data(client.send_request(req or request()))
    return client, server


def test_request_chunks_result_round_trip():
    req = request()
    client, server = connected(req=req)
    assert server.next_event() == req
    assert server.next_event() is None
    output = {"text": "hello world", "tokens": [1, 2, 3], "nested": {"ok": True}}
    data = server.send(Chunk(0, "hello")) + server.send(Chunk(1, " world"))
    assert server.streamed.digest() == reason.chunks_digest(["hello", " world"])
    data += server.send(result_for(req, output, chunks=("hello", " world")))
    client.receive_data(data)
    assert client.next_event() == Chunk(0, "hello")
    assert client.next_event() == Chunk(1, " world")
    result = client.next_event()
    assert result.output == output and result.model == "llama" and result.usage == USAGE
    assert client.next_event() is None
    assert client.state == server.state == reason.DONE


def test_error_answer():
    client, server = connected()
    server.next_event()
    client.receive_data(server.send(Error(reason.OVERLOADED, "busy", retryable=True)))
    assert client.next_event() == Error("overloaded", "busy", True)


def test_a_minimal_request_on_the_wire_takes_defaults():
    server = ReasonServer()
    fields = {"request_id": RID, "capability": "chat", "input": "", "budget": 2, "hop_limit": 0}
    server.receive_data(pack_message("request", fields, max_frame=MAX_FRAME))
    assert server.next_event() == Request(RID, "chat", "", {}, 2.0, 0)


def test_unknown_fields_are_ignored():
    server = ReasonServer()
    fields = request()._to_wire() | {"priority": 7}
    server.receive_data(pack_message("request", fields, max_frame=MAX_FRAME))
    assert server.next_event() == request()


def test_the_largest_input_fits_in_a_frame():
    req = request(input="x" * reason.MAX_INPUT_BYTES, params={f"p{i}": "v" * 4096 for i in range(32)})
    client, server = connected(req=req)
    assert server.next_event() == req


# ---- receipts ------------------------------------------------------------------------------------


def test_receipt_round_trip_and_what_it_commits_to():
    req = request()
    receipt = open_receipt(result_for(req).receipt, provider=PROVIDER.peer_id, now=NOW)
    assert receipt == Receipt(
        request_id=RID,
        capability="chat",
        model="llama",
        input_sha256=hashlib.sha256(b"hello").digest(),
        output_sha256=hashlib.sha256(canonical.encode("hello world")).digest(),
        provider=PROVIDER.peer_id,
        client=CLIENT.peer_id,
        issued=NOW,
        params_sha256=hashlib.sha256(canonical.encode(req.params)).digest(),
        chunks_sha256=hashlib.sha256().digest(),  # nothing streamed
    )
    assert receipt.output_sha256 == output_digest("hello world")
    assert receipt.params_sha256 == reason.params_digest(req.params)


def test_receipt_verification_failures():
    data = result_for(request()).receipt
    with pytest.raises(WrongKey):
        open_receipt(data, provider=MALLORY.peer_id)
    with pytest.raises(RecordExpired):
        open_receipt(data, provider=PROVIDER.peer_id, now=NOW + reason.RECEIPT_TTL)
    open_receipt(data, provider=PROVIDER.peer_id)  # no now: expiry not checked
    tampered = bytearray(data)
    tampered[tampered.index(b"llama")] ^= 1
    with pytest.raises(InvalidSignature):
        open_receipt(bytes(tampered), provider=PROVIDER.peer_id)


@pytest.mark.parametrize(
    "result",
    [
        result_for(request(request_id=b"\xff" * 16)),  # a receipt for another request
        result_for(request(), output="something else"),  # ... for another output
        result_for(request(input="other input")),  # ... for another input
        result_for(request(), key=MALLORY),  # ... from another provider
        result_for(request(), client=MALLORY.peer_id),  # ... issued to another asker
        result_for(request(params={"temperature": 2.0}), client=CLIENT.peer_id),  # ... run with other params
        result_for(request(model="tiny"), model="tiny"),  # ... answered by a model not asked for
        result_for(request(), chunks=("hello",)),  # ... after chunks the asker never got
    ],
)
def test_the_client_checks_the_receipt_against_request_output_and_provider(result):
    client, server = connected()
    server.next_event()
    tampered = Result("hello world", result.model, result.usage, result.receipt)
    client.receive_data(server.send(tampered))
    with pytest.raises(RemoteProtocolError):
        client.next_event()
    assert client.state == reason.ERROR


def test_the_receipt_commits_to_the_streamed_chunks_their_split_and_the_params():
    req = request()
    honest = result_for(req, chunks=("hel", "lo"))

    def received(*texts):
        client, server = connected(req=req)
        server.next_event()
        client.receive_data(b"".join(server.send(Chunk(i, t)) for i, t in enumerate(texts)) + server.send(honest))
        for _ in texts:
            client.next_event()
        return client.next_event()

    assert received("hel", "lo").output == "hello world"
    # A forwarder that alters, drops, adds or re-splits chunks is caught by the asker.
    for texts in [("hel", "LO"), ("hel",), ("hel", "lo", "!"), ("hello",), ("he", "llo")]:
        with pytest.raises(RemoteProtocolError, match="chunks"):
            received(*texts)
    # A receipt for the same request with another params map is refused, whatever else matches.
    other_params = result_for(request(params={"temperature": 0.2}))
    client, server = connected(req=req)
    server.next_event()
    client.receive_data(server.send(other_params))
    with pytest.raises(RemoteProtocolError, match="params"):
        client.next_event()


def test_without_a_requested_model_any_model_may_answer():
    req = request(model=None)
    client, server = connected(req=req)
    server.next_event()
    client.receive_data(server.send(result_for(req, model="tiny")))
    assert client.next_event().model == "tiny"


@settings(max_examples=100)
@given(st.lists(st.text(max_size=6), max_size=5), st.lists(st.text(max_size=6), max_size=5))
def test_chunk_digests_differ_for_different_sequences(a, b):
    assert (reason.chunks_digest(a) == reason.chunks_digest(b)) == (a == b)
    streamed = reason.ChunkDigest()
    for text in a:
        streamed.update(text)
    assert streamed.digest() == reason.chunks_digest(a)


def test_without_a_provider_the_receipt_is_passed_on_unread():
    client, server = connected(provider=None)
    server.next_event()
    result = Result("out", "llama", USAGE, b"opaque")
    client.receive_data(server.send(result))
    assert client.next_event() == result


# ---- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {"request_id": b"short"},
        {"capability": "two words"},
        {"input": "x" * (reason.MAX_INPUT_BYTES + 1)},
        {"input": "é" * (reason.MAX_INPUT_BYTES // 2 + 1)},  # the cap is in UTF-8 bytes
        {"input": b"bytes"},
        {"params": {f"p{i}": 1 for i in range(33)}},
        {"params": {"list": [1]}},
        {"params": {"": 1}},
        {"params": {"nan": float("nan")}},
        {"params": {"big": 1 << 63}},
        {"params": {"s": "x" * 4097}},
        {"params": [("a", 1)]},
        {"budget": float("inf")},
        {"budget": "soon"},
        {"budget": -0.5},  # a budget is what is left, never less than nothing
        {"budget": reason.MAX_BUDGET + 1},
        {"hop_limit": 33},
        {"hop_limit": -1},
        {"hop_limit": True},
        {"visited": (CLIENT.peer_id,) * 33},
        {"visited": (str(CLIENT.peer_id),)},
        {"grant": "text"},
        {"grant": b"g" * ((16 << 10) + 1)},
        {"model": ""},
    ],
)
def test_request_fields_are_checked(changes):
    with pytest.raises(LocalProtocolError):
        request(**changes)


@pytest.mark.parametrize(
    "changes",
    [
        {"hop_limit": 33},
        {"capability": "two words"},
        {"visited": [b"\x00\x01"]},
        {"visited": [b"x"] * 33},
        {"visited": "peer"},
        {"params": {"list": [1]}},
        {"request_id": "text"},
        {"model": 5},
        {"budget": None},
        {"budget": -1},
    ],
)
def test_invalid_requests_from_the_peer_are_remote_errors(changes):
    server = ReasonServer()
    server.receive_data(pack_message("request", request()._to_wire() | changes, max_frame=MAX_FRAME))
    with pytest.raises(RemoteProtocolError):
        server.next_event()
    # the server may still answer before closing
    assert server.send(Error(reason.INVALID_INPUT, "bad request", retryable=False))
    assert server.state == reason.DONE


def test_result_output_is_checked():
    deep: object = "leaf"
    for _ in range(reason.MAX_OUTPUT_DEPTH):
        deep = [deep]
    Result(deep, "m", USAGE, b"r")
    with pytest.raises(LocalProtocolError):
        Result([deep], "m", USAGE, b"r")
    with pytest.raises(LocalProtocolError):
        Result({1: "int key"}, "m", USAGE, b"r")
    with pytest.raises(LocalProtocolError):
        Result(object(), "m", USAGE, b"r")
    with pytest.raises(LocalProtocolError):
        output_digest({"x": float("nan")})


@pytest.mark.parametrize(
    "make",
    [
        lambda: Chunk(-1, "x"),
        lambda: Chunk(0, b"x"),
        lambda: Usage(-1, 0, 0.0),
        lambda: Usage(0, 0, -1.0),
        lambda: Error("Bad Code", "", False),
        lambda: Error("internal", "", "no"),
        lambda: Result("x", "", USAGE, b"r"),
        lambda: Result("x", "m", (1, 2, 3.0), b"r"),
        lambda: Result("x", "m", USAGE, b""),
    ],
)
def test_events_check_their_fields(make):
    with pytest.raises(LocalProtocolError):
        make()


# ---- state machines ---------------------------------------------------------------------------------


def test_chunks_must_count_up_by_one():
    client, _ = connected()
    client.receive_data(pack_message("chunk", {"seq": 0, "text": "a"}, max_frame=MAX_FRAME))
    client.receive_data(pack_message("chunk", {"seq": 2, "text": "c"}, max_frame=MAX_FRAME))
    assert client.next_event() == Chunk(0, "a")
    with pytest.raises(RemoteProtocolError, match="expected 1"):
        client.next_event()
    with pytest.raises(RemoteProtocolError):
        client.next_event()  # the error state sticks


def test_anything_after_the_result_or_error_is_a_remote_error():
    for final in (result_for(request()), Error(reason.INTERNAL, "oops", retryable=False)):
        client, server = connected()
        server.next_event()
        client.receive_data(server.send(final) + pack_message("chunk", {"seq": 0, "text": "late"}, max_frame=MAX_FRAME))
        assert client.next_event() is not None
        with pytest.raises(RemoteProtocolError):
            client.next_event()


def test_an_answer_before_the_request_is_a_remote_error():
    client = ReasonClient()
    client.receive_data(pack_message("chunk", {"seq": 0, "text": "x"}, max_frame=MAX_FRAME))
    with pytest.raises(RemoteProtocolError):
        client.next_event()


def test_a_second_request_on_the_stream_is_a_remote_error():
    server = ReasonServer()
    data = ReasonClient().send_request(request())
    server.receive_data(data + data)
    assert server.next_event() == request()
    with pytest.raises(RemoteProtocolError):
        server.next_event()


def test_client_misuse():
    client, _ = connected()
    with pytest.raises(LocalProtocolError):
        client.send_request(request())
    with pytest.raises(LocalProtocolError):
        ReasonClient().send_request({"capability": "chat"})


def test_server_misuse():
    server = ReasonServer()
    with pytest.raises(LocalProtocolError):
        server.send(Chunk(0, "before the request"))
    with pytest.raises(LocalProtocolError):
        server.send(result_for(request()))
    _, server = connected()
    server.next_event()
    with pytest.raises(LocalProtocolError):
        server.send(Chunk(1, "skips 0"))
    server.send(Chunk(0, "a"))
    with pytest.raises(LocalProtocolError):
        server.send(Chunk(0, "again"))
    with pytest.raises(LocalProtocolError):
        server.send(Error("made-up", "", False))
    with pytest.raises(LocalProtocolError):
        server.send("text")
    server.send(Error(reason.CANCELLED, "bye", retryable=False))
    with pytest.raises(LocalProtocolError):
        server.send(Chunk(1, "after the end"))
    with pytest.raises(LocalProtocolError):
        server.send(Error(reason.INTERNAL, "twice", retryable=False))


def test_an_error_may_be_sent_before_the_request_arrives():
    server = ReasonServer()
    client = ReasonClient()
    client.send_request(request())
    client.receive_data(server.send(Error(reason.OVERLOADED, "shedding load", retryable=True)))
    assert client.next_event().code == reason.OVERLOADED


def test_unknown_error_codes_from_the_peer_are_accepted():
    client, _ = connected()
    fields = {"code": "quota-exceeded", "message": "later", "retryable": True}
    client.receive_data(pack_message("error", fields, max_frame=MAX_FRAME))
    assert client.next_event() == Error("quota-exceeded", "later", True)


def test_end_of_stream():
    client, server = connected()
    server.next_event()
    server.receive_data(b"")  # the client may half-close after its request
    assert server.next_event() is None
    client.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="ended"):
        client.next_event()
    with pytest.raises(LocalProtocolError):
        client.receive_data(b"more")
    idle = ReasonServer()
    idle.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="ended"):
        idle.next_event()


# ---- properties ---------------------------------------------------------------------------------------

param_values = (
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), (1 << 63) - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
requests = st.builds(
    Request,
    request_id=st.binary(min_size=16, max_size=16),
    capability=st.from_regex(r"[a-z0-9._:-]{1,64}", fullmatch=True),
    input=st.text(max_size=200),
    params=st.dictionaries(st.text(min_size=1, max_size=10), param_values, max_size=5),
    budget=st.floats(0, reason.MAX_BUDGET),
    hop_limit=st.integers(0, 32),
    visited=st.lists(st.sampled_from([CLIENT.peer_id, PROVIDER.peer_id, MALLORY.peer_id]), max_size=5).map(tuple),
    grant=st.none() | st.binary(max_size=50),
    model=st.none() | st.text(min_size=1, max_size=20),
)
outputs = st.recursive(
    param_values | st.floats(allow_nan=False),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=10,
)


@settings(max_examples=50)
@given(requests, st.lists(st.text(max_size=20), max_size=4), outputs)
def test_round_trip_property(req, texts, output):
    client, server = connected(req=req)
    assert server.next_event() == req
    data = b"".join(server.send(Chunk(i, text)) for i, text in enumerate(texts))
    data += server.send(result_for(req, output, chunks=texts, model=req.model or "llama"))
    client.receive_data(data)
    for i, text in enumerate(texts):
        assert client.next_event() == Chunk(i, text)
    assert client.next_event().output == output


def expect_typed(endpoint, data):
    try:
        endpoint.receive_data(data)
        while (event := endpoint.next_event()) is not None:
            assert isinstance(event, (Request, Chunk, Result, Error))
    except RemoteProtocolError:
        pass


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_any_bytes_into_either_side(data):
    client, _ = connected()
    expect_typed(client, data)
    expect_typed(ReasonServer(), data)
    expect_typed(ReasonServer(), encode_frame(data))


request_fields = st.sampled_from(list(request()._to_wire()) + ["x"])
answer_fields = st.sampled_from(
    ["seq", "text", "output", "model", "usage", "receipt", "code", "message", "retryable", "queue", "capacity", "via"]
)


@settings(max_examples=300)
@given(st.dictionaries(request_fields, canonical_values, max_size=3))
def test_any_request_fields_into_the_server(changes):
    expect_typed(ReasonServer(), pack_message("request", request()._to_wire() | changes, max_frame=MAX_FRAME))


@settings(max_examples=300)
@given(st.sampled_from(["chunk", "result", "error", "request"]), st.dictionaries(answer_fields, canonical_values))
def test_any_answer_into_the_client(kind, fields):
    for provider in (None, PROVIDER.peer_id):
        client, _ = connected(provider=provider)
        expect_typed(client, pack_message(kind, fields, max_frame=MAX_FRAME))


@settings(max_examples=200)
@given(st.binary(max_size=300))
def test_any_bytes_into_open_receipt(data):
    try:
        receipt = open_receipt(data, provider=PROVIDER.peer_id)
    except (IdentityError, RemoteProtocolError):
        return
    assert isinstance(receipt, Receipt)
