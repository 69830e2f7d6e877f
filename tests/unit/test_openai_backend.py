"""The openai: backend against a real OpenAI-compatible server on loopback; its decoders."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import math

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from modelnet.models.base import (
    InvalidInput,
    ModelError,
    UnknownModel,
    UpstreamBusy,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
    decode_messages,
    encode_messages,
)
from modelnet.models.embedded import hashed_embedding
from modelnet.models.openai_http import DEFAULT_KEY_ENV, OpenAIBackend, SSEDecoder, Spec, network_name
from modelnet.models.registry import discover_models, load_backends
from modelnet.p2p.node import RequestFailed
from modelnet.testing import open_memory_swarm
from modelnet.testing.openai_upstream import chat_reply, completion_reply, open_upstream, split_tokens

KEY = "sk-test-123"
MODELS = ["tiny-chat", "tiny-complete", "Org/Tiny-Embed"]
SPEC_MODELS = "#tiny-chat,tiny-complete=completion,Org/Tiny-Embed"


async def collect(backend, model, text, params=None):
    async with contextlib.aclosing(backend.run(model, text, params or {})) as items:
        return [item async for item in items]


def split(items):
    return [item.text for item in items[:-1]], items[-1].value


@pytest.fixture
async def upstream():
    async with open_upstream(MODELS, api_key=KEY, context_length=4096) as server:
        yield server


@pytest.fixture
async def backend(upstream, monkeypatch):
    monkeypatch.setenv(DEFAULT_KEY_ENV, KEY)
    (backend,) = load_backends([f"openai:{upstream.base_url}{SPEC_MODELS}"])
    yield backend
    await backend.aclose()


# --- specs and names ----------------------------------------------------------------------


def test_spec_parsing():
    spec = Spec.parse("http://127.0.0.1:11434/v1/?key_env=MY_KEY&timeout=2.5&context=8192#llama3.2:1b, nomic-embed=embed")
    assert spec.base_url == "http://127.0.0.1:11434/v1"
    assert spec.models == (("llama3.2:1b", None), ("nomic-embed", "embed"))
    assert (spec.key_env, spec.read_timeout, spec.context_length) == ("MY_KEY", 2.5, 8192)
    assert Spec.parse("https://h/v1").models == ()


@pytest.mark.parametrize(
    "argument",
    [
        "127.0.0.1:11434/v1",
        "ftp://h/v1",
        "http:///v1",
        "http://h/v1?verbose=1",
        "http://h/v1?timeout=0",
        "http://h/v1?timeout=nan",
        "http://h/v1?context=1.5",
        "http://h/v1?key_env=1BAD",
        "http://h/v1#m=classify",
    ],
)
def test_bad_specs(argument):
    with pytest.raises(ModelError):
        load_backends([f"openai:{argument}"])


def test_bad_registry_specs(monkeypatch):
    with pytest.raises(ModelError, match="server's URL"):
        load_backends(["openai"])
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    with pytest.raises(ModelError, match="NOT_SET_ANYWHERE"):
        load_backends(["openai:http://h/v1?key_env=NOT_SET_ANYWHERE#m"])
    with pytest.raises(ModelError, match="served by both"):
        load_backends(["openai:http://h/v1#m", "openai:http://other/v1#M"])


def test_network_names_are_capability_tags():
    assert network_name("Qwen/Qwen2.5-7B-Instruct") == "qwen-qwen2.5-7b-instruct"
    assert network_name("llama3.2:1b") == "llama3.2:1b"
    assert len(network_name("x" * 100)) == 58
    backend = OpenAIBackend("http://h/v1", ["Org/Tiny-Embed", ("base", "completion")])
    assert [(i.name, i.task, i.streaming) for i in backend.models()] == [("org-tiny-embed", "embed", False), ("base", "completion", True)]
    assert backend.upstream_id("org-tiny-embed") == "Org/Tiny-Embed"


# --- against the server ------------------------------------------------------------------


async def test_discover_reads_models_and_context_length(upstream, monkeypatch):
    monkeypatch.setenv(DEFAULT_KEY_ENV, KEY)
    (everything,) = load_backends([f"openai:{upstream.base_url}"])
    assert everything.models() == []  # nothing is known before the server is asked
    await discover_models([everything])
    infos = {info.name: info for info in everything.models()}
    assert list(infos) == ["tiny-chat", "tiny-complete", "org-tiny-embed"]
    assert [info.task for info in infos.values()] == ["chat", "chat", "embed"]
    assert infos["tiny-chat"].context_length == 4096
    assert infos["tiny-chat"].max_input_bytes == 4096 * 8
    assert [seen.path for seen in upstream.requests] == ["/v1/models"]
    await everything.aclose()


async def test_discover_failure(upstream):
    (nameless,) = load_backends([f"openai:{upstream.base_url}"])  # no key: 401
    with pytest.raises(UpstreamError, match="cannot list the models") as info:
        await nameless.discover()
    assert info.value.status == 401
    (named,) = load_backends([f"openai:{upstream.base_url}#tiny-chat"])
    assert [i.name for i in await named.discover()] == ["tiny-chat"]  # declared models stay


async def test_chat_streams_deltas_and_sends_the_key(upstream, backend):
    chunks, output = split(await collect(backend, "tiny-chat", "tell me about the network"))
    assert output == chat_reply([{"role": "user", "content": "tell me about the network"}])
    assert chunks == split_tokens(output) and len(chunks) > 3
    seen = upstream.requests[-1]
    assert seen.path == "/v1/chat/completions" and seen.authorization == f"Bearer {KEY}"
    assert seen.body == {"model": "tiny-chat", "messages": [{"role": "user", "content": "tell me about the network"}], "stream": True}


async def test_chat_conversation_and_params(upstream, backend):
    text, params = encode_messages(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "what is 6 * 7"}]
    )
    params.update(system="math", temperature=0.2, max_tokens=1, stop="\n", seed=3, top_p=1)
    _, output = split(await collect(backend, "tiny-chat", text, params))
    assert output == "[math]"  # max_tokens=1 cut "[math] 42"
    body = upstream.requests[-1].body
    assert body["messages"][0] == {"role": "system", "content": "math"} and len(body["messages"]) == 4
    assert (body["temperature"], body["max_tokens"], body["stop"], body["seed"], body["top_p"]) == (0.2, 1, "\n", 3, 1.0)


@pytest.mark.parametrize(
    "params",
    [
        {"temprature": 0.5},
        {"temperature": 3},
        {"temperature": True},
        {"max_tokens": 0},
        {"max_tokens": 5000},  # over the declared context length
        {"stop": ""},
        {"input_format": "xml"},
        {"input_format": "messages"},  # the text is not JSON
        {"dimensions": 8},  # an embedding parameter
    ],
)
async def test_bad_chat_params_are_refused_before_any_request(upstream, backend, params):
    await backend.discover()  # learn the context length
    before = len(upstream.requests)
    with pytest.raises(InvalidInput):
        await collect(backend, "tiny-chat", "hello", params)
    assert len(upstream.requests) == before


async def test_completion_and_embedding(upstream, backend):
    chunks, output = split(await collect(backend, "tiny-complete", "one two three"))
    assert output == completion_reply("one two three") and "".join(chunks) == output
    assert upstream.requests[-1].body["prompt"] == "one two three"
    [result] = await collect(backend, "org-tiny-embed", "peer to peer models")
    assert result.value == pytest.approx(hashed_embedding("peer to peer models"))
    [small] = await collect(backend, "org-tiny-embed", "peer to peer models", {"dimensions": 16})
    assert len(small.value) == 16 and math.isclose(sum(x * x for x in small.value), 1.0)
    assert upstream.requests[-1].body == {"model": "Org/Tiny-Embed", "dimensions": 16, "input": "peer to peer models", "encoding_format": "float"}


@pytest.mark.parametrize(
    ("status", "error"),
    [(500, UpstreamError), (503, UpstreamError), (429, UpstreamBusy), (400, InvalidInput), (422, InvalidInput), (404, UnknownModel), (403, UpstreamError)],
)
async def test_http_errors_are_typed(upstream, backend, status, error):
    upstream.faults.status = status
    for model in ("tiny-chat", "org-tiny-embed"):
        with pytest.raises(error, match=f"HTTP {status}"):
            await collect(backend, model, "hello")
    assert not isinstance(InvalidInput("x"), UpstreamError)  # input errors stop failover; upstream ones don't


async def test_wrong_key(upstream, monkeypatch):
    monkeypatch.setenv("OTHER_KEY", "sk-wrong")
    (backend,) = load_backends([f"openai:{upstream.base_url}?key_env=OTHER_KEY#tiny-chat"])
    with pytest.raises(UpstreamError, match="HTTP 401.*API key") as info:
        await collect(backend, "tiny-chat", "hello")
    assert info.value.status == 401 and upstream.requests[-1].authorization == "Bearer sk-wrong"


async def test_upstream_model_gone(upstream, backend):
    (stale,) = load_backends([f"openai:{upstream.base_url}#retired-model"])
    stale.api_key = KEY
    with pytest.raises(UnknownModel, match="does not exist"):
        await collect(stale, "retired-model", "hello")


async def test_hang_times_out(upstream, monkeypatch):
    monkeypatch.setenv(DEFAULT_KEY_ENV, KEY)
    (backend,) = load_backends([f"openai:{upstream.base_url}?timeout=0.3#tiny-chat"])
    upstream.faults.hang = True
    with pytest.raises(UpstreamTimeout):
        await collect(backend, "tiny-chat", "hello")


async def test_stalled_stream_times_out(upstream, monkeypatch):
    monkeypatch.setenv(DEFAULT_KEY_ENV, KEY)
    (backend,) = load_backends([f"openai:{upstream.base_url}?timeout=0.3#tiny-chat"])
    upstream.faults.chunk_delay = 5.0
    with pytest.raises(UpstreamTimeout):
        await collect(backend, "tiny-chat", "hello there")


@pytest.mark.parametrize(("malformed", "model"), [("json", "org-tiny-embed"), ("sse", "tiny-chat"), ("sse", "tiny-complete")])
async def test_malformed_answers(upstream, backend, malformed, model):
    upstream.faults.malformed = malformed
    with pytest.raises(UpstreamError, match="malformed"):
        await collect(backend, model, "hello there friend")


async def test_unreachable_server():
    with trio.socket.socket() as sock:  # a port that was free a moment ago: nothing listens
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    backend = OpenAIBackend(f"http://127.0.0.1:{port}/v1", ["m"])
    with pytest.raises(UpstreamUnavailable, match="cannot reach"):
        await collect(backend, "m", "hello")


async def test_what_a_remote_asker_would_be_told_never_quotes_the_model_server(upstream, backend):
    # review finding 10: bodies can echo a key or name internals; ``public`` keeps the kind and status
    for status, public in [(500, "upstream failed (HTTP 500)"), (429, "upstream busy (HTTP 429)"),
                           (400, "the model server refused the input (HTTP 400)"),
                           (404, "the model server does not know the model (HTTP 404)")]:  # fmt: skip
        upstream.faults.status = status
        with pytest.raises(ModelError) as info:
            await collect(backend, "tiny-chat", "hello")
        assert "injected failure" in str(info.value) and info.value.public == public
    assert UpstreamTimeout("t").public == "upstream timed out" and UpstreamUnavailable("u").public == "upstream unreachable"
    assert InvalidInput("input is empty").public == "input is empty"  # our own words are fine to send


async def test_a_remote_asker_gets_only_the_kind_of_upstream_failure(upstream, caplog):
    # End to end, on the memory network (real clock: the upstream is a real server). A
    # base_url with credentials appears nowhere, not even in local logs.
    backend = OpenAIBackend(upstream.base_url.replace("http://", "http://admin:hunter2@"), ["tiny-chat"], api_key="sk-wrong-key")
    assert "hunter2" not in backend.label and backend.label.endswith("/v1")
    async with open_memory_swarm(2, backends_for=lambda i: [backend] if i else []) as swarm:
        with caplog.at_level(logging.INFO):
            with pytest.raises(RequestFailed) as info:
                await swarm.nodes[0].ask("chat", "hello")
    await backend.aclose()
    assert upstream.requests[-1].authorization == "Basic " + base64.b64encode(b"admin:hunter2").decode()  # still sent
    [attempt] = info.value.errors
    told = f"{info.value} {attempt.message}"
    assert attempt.message.endswith("upstream failed (HTTP 401)")
    for secret in ("Incorrect API key", "hunter2", "admin", "sk-wrong", "127.0.0.1", "completions", "key_env"):
        assert secret not in told
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name == "modelnet.p2p.serving")
    assert "HTTP 401: Incorrect API key provided" in logged  # the full text stays with the operator
    assert "hunter2" not in caplog.text


async def test_unknown_model_and_bad_text(backend):
    with pytest.raises(UnknownModel):
        await collect(backend, "gpt-5", "hello")
    with pytest.raises(InvalidInput):
        await collect(backend, "tiny-chat", "   ")


# --- decoders -------------------------------------------------------------------------------


def sse(events):
    return b"".join(b"".join(b"data: " + line.encode() + b"\n" for line in event.split("\n")) + b"\n" for event in events)


@settings(max_examples=100, deadline=None)
@given(
    events=st.lists(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\x00"), min_size=1, max_size=30), max_size=6),
    cuts=st.lists(st.integers(0, 400), max_size=5),
    crlf=st.booleans(),
)
def test_sse_round_trip_at_any_split(events, cuts, crlf):
    data = sse(events)
    if crlf:
        data = data.replace(b"\n", b"\r\n")
    decoder = SSEDecoder()
    found = []
    last = 0
    for cut in sorted(c for c in cuts if c <= len(data)) + [len(data)]:
        found += decoder.feed(data[last:cut])
        last = cut
    assert found == events


def test_sse_comments_fields_and_multiline():
    decoder = SSEDecoder()
    assert decoder.feed(b": keepalive\nevent: message\nid: 3\ndata: {\"a\":\ndata:1}\n\ndata: [DONE]\n\n") == ['{"a":\n1}', "[DONE]"]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_sse_any_bytes_give_text_or_a_typed_error(data):
    decoder = SSEDecoder(max_event_bytes=64)
    try:
        assert all(isinstance(event, str) for event in decoder.feed(data))
    except UpstreamError:
        pass


def test_sse_event_size_is_bounded():
    decoder = SSEDecoder(max_event_bytes=100)
    with pytest.raises(UpstreamError, match="exceeds"):
        decoder.feed(b"data: " + b"x" * 200)  # no newline yet: still bounded
    with pytest.raises(UpstreamError, match="exceeds"):
        SSEDecoder(max_event_bytes=100).feed(b"data: xxxxxxxxxx\n" * 20)


messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": st.text(max_size=20)}), min_size=1, max_size=4
)


@settings(max_examples=100, deadline=None)
@given(messages)
def test_messages_round_trip(conversation):
    text, params = encode_messages(conversation)
    assert decode_messages(text, params) == conversation


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=100) | st.builds(json.dumps, st.lists(st.dictionaries(st.sampled_from(["role", "content"]), st.text(max_size=5) | st.integers()))))
def test_any_messages_input_gives_a_conversation_or_invalid_input(text):
    try:
        conversation = decode_messages(text, {"input_format": "messages"})
    except InvalidInput:
        return
    assert conversation and all(set(m) == {"role", "content"} for m in conversation)


def test_plain_text_is_one_user_message():
    assert decode_messages("[1, 2]", {}) == [{"role": "user", "content": "[1, 2]"}]


def test_hashed_embedding():
    a, b, c = (hashed_embedding(t) for t in ("the cat sat on the mat", "the cats sat on a mat", "quarterly revenue report"))
    assert len(a) == 256 and math.isclose(sum(x * x for x in a), 1.0)
    assert a == hashed_embedding("The CAT sat on the mat!")  # case and punctuation do not matter
    cos = lambda u, v: sum(x * y for x, y in zip(u, v))  # noqa: E731
    assert cos(a, b) > 0.5 > cos(a, c)
    assert hashed_embedding("   ...   ") == [0.0] * 256


# --- declared capabilities reach the record ---------------------------------------------------


def test_declared_limits_reach_the_signed_record():
    from modelnet.identity import PrivateKey, canonical
    from modelnet.p2p.serving import model_capability
    from modelnet.protocols import capability as cap
    from modelnet.protocols.errors import RemoteProtocolError

    key = PrivateKey.from_seed(b"\x01" * 32)
    (info,) = OpenAIBackend("http://h/v1", ["llama3.2:1b"], context_length=8192).models()
    model = model_capability(info)
    assert (model.context_length, model.max_output_tokens, model.task) == (8192, 8192, "chat")
    assert model.capability_tags() == ("chat", "model:llama3.2:1b", "openai-api")
    record = cap.CapabilityRecord(peer_id=key.peer_id, addrs=(), models=(model,))
    _, opened = cap.open_capability_record(record.sign(key, seq=1, expires=2e9).encode(), now=1e9)
    assert opened.models == (model,)
    # Undeclared limits are absent from the wire, so older records stay byte-identical.
    plain = cap.ModelCapability("m", "chat")
    assert set(plain._to_wire()) == {"name", "task", "tags", "description", "max_input_bytes", "streaming"}
    wire = canonical.encode({"peer": key.peer_id.bytes, "addrs": [], "models": [dict(plain._to_wire(), context_length="big")]})
    with pytest.raises(RemoteProtocolError, match="context_length"):
        cap.CapabilityRecord.from_payload(wire)
    wire = canonical.encode({"peer": key.peer_id.bytes, "addrs": [], "models": [dict(plain._to_wire(), max_output_tokens=0)]})
    with pytest.raises(RemoteProtocolError, match="max_output_tokens"):
        cap.CapabilityRecord.from_payload(wire)
