"""Tier 1: the OpenAI wire format and the gateway's config, pure."""

from __future__ import annotations

import base64
import json
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelnet.gateway import ApiError, ListenError, load_api_keys, parse_http_address
from modelnet.gateway import openai_api as api
from modelnet.gateway.config import Config
from modelnet.models.base import decode_messages

PARSERS = (api.parse_chat, api.parse_completion, api.parse_embeddings)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
field_names = st.sampled_from(
    ["model", "messages", "prompt", "input", "stream", "temperature", "max_tokens", "stop", "n", "modelnet",
     "encoding_format", "dimensions", "tools", "role", "content", "user", "seed"]
)  # fmt: skip
bodies = st.dictionaries(field_names, json_values, max_size=6)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_are_a_request_or_a_400(data):
    for parse in PARSERS:
        try:
            parse(data)
        except ApiError as exc:
            assert exc.status == 400 and set(exc.body()["error"]) == {"message", "type", "param", "code"}


@settings(max_examples=300, deadline=None)
@given(bodies)
def test_any_json_object_is_a_valid_request_or_a_400(body):
    data = json.dumps(body).encode()
    for parse in PARSERS:
        try:
            request = parse(data)
        except ApiError as exc:
            assert exc.status == 400
            continue
        assert request.model and request.model == request.model.strip()
        for task in ("chat", "completion", "sentiment", None):
            text, params = request.input_for(task) if hasattr(request, "input_for") else (None, request.params_for(task))
            assert all(v is None or isinstance(v, (str, int, float, bool)) for v in params.values())
            if text is not None:
                assert isinstance(text, str)


def test_deep_nesting_is_a_400_not_a_crash():
    with pytest.raises(ApiError) as deep:
        api.parse_chat(b"[" * 100_000 + b"]" * 100_000)
    assert deep.value.status == 400


def chat(**fields) -> api.ChatRequest:
    return api.parse_chat(json.dumps({"model": "m", **fields}).encode())


def test_chat_input_depends_on_the_task():
    one = chat(messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}], temperature=0.5, stop=["x"])
    assert one.input_for("chat") == ("hi", {"temperature": 0.5, "stop": "x", "system": "be brief"})
    assert one.input_for("sentiment") == ("hi", {})  # classifiers get no sampling parameters
    turns = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "c"},
        {"role": "user", "content": "d"},
    ]
    many = chat(messages=turns, modelnet={"params": {"temperature": 1.0}})
    text, params = many.input_for("chat")
    assert decode_messages(text, params) == [dict(t, content="ab") if t["role"] == "user" and t["content"] != "d" else t for t in turns]
    assert params["temperature"] == 1.0  # explicit modelnet params win
    assert many.input_for("completion")[0] == "user: ab\n\nassistant: c\n\nuser: d"
    assert many.input_for("sentiment")[0] == "d"


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0]"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": True}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b"]}, "stop"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
        ({"messages": [{"role": "user", "content": "x"}], "frobnicate": 1}, "frobnicate"),
        ({"messages": [{"role": "user", "content": "x"}], "modelnet": {"timeout": 0}}, "modelnet.timeout"),
        ({"messages": [{"role": "user", "content": "x"}], "modelnet": {"params": {"a": [1]}}}, "modelnet.params"),
    ],
)
def test_bad_chat_requests_name_the_field(fields, param):
    with pytest.raises(ApiError) as bad:
        chat(**fields)
    assert bad.value.status == 400 and bad.value.param == param


def test_embeddings_round_trip_in_both_encodings():
    request = api.parse_embeddings(json.dumps({"model": "e", "input": ["a", "b"], "encoding_format": "base64"}).encode())
    assert request.inputs == ("a", "b") and request.encoding_format == "base64"
    vector = [0.5, -0.25, 1e-3]
    answer = api.embedding_list(model="e", vectors=[vector], encoding_format="base64", extension={})
    decoded = struct.unpack("<3f", base64.b64decode(answer["data"][0]["embedding"]))
    assert decoded == pytest.approx(vector)
    assert api.embedding_list(model="e", vectors=[vector], encoding_format="float", extension={})["data"][0]["embedding"] == vector
    assert api.vector_of({"embedding": [1, 2]}) == [1.0, 2.0]
    assert api.vector_of({"label": "positive"}) is None and api.vector_of([1.0, float("nan")]) is None


def test_outputs_render_as_text():
    assert api.output_text("plain") == "plain"
    assert json.loads(api.output_text({"label": "positive", "score": 0.5})) == {"label": "positive", "score": 0.5}
    assert json.loads(api.output_text({"raw": b"\x00\x01"})) == {"raw": "AAE="}
    assert api.sse({"a": "é"}) == 'data: {"a":"é"}\n\n'.encode()


def test_listening_beyond_loopback_needs_keys():
    for host in ("127.0.0.1", "127.5.5.5", "::1", "localhost"):
        Config(host=host)
    for host in ("0.0.0.0", "::", "192.168.1.10", "example.org"):
        with pytest.raises(ListenError, match="without API keys"):
            Config(host=host)
        Config(host=host, api_keys=frozenset({"k" * 20}))
    assert parse_http_address("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_http_address("[::1]:0") == ("::1", 0)
    for bad in ("8080", "host:", ":80", "h:99999", "h:x"):
        with pytest.raises(ListenError):
            parse_http_address(bad)
    keys = Config(api_keys=frozenset({"a" * 20, "b" * 20}))
    assert keys.key_matches("b" * 20) and not keys.key_matches("c" * 20) and not keys.key_matches("")


def test_api_key_files(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# gateway keys\nsk-0123456789abcdef\n\n  sk-fedcba9876543210  \n")
    os.chmod(path, 0o600)
    assert load_api_keys(path) == {"sk-0123456789abcdef", "sk-fedcba9876543210"}
    for content, why in (("# nothing\n", "holds no key"), ("short\n", "at least"), ("has a space in it ok\n", "without spaces")):
        path.write_text(content)
        with pytest.raises(ListenError, match=why):
            load_api_keys(path)
    path.write_bytes(b"\xff\xfe" * 10)
    with pytest.raises(ListenError, match="UTF-8"):
        load_api_keys(path)
    with pytest.raises(ListenError, match="cannot read"):
        load_api_keys(tmp_path / "missing")
