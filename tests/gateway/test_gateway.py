"""The gateway end to end: the official ``openai`` client, unmodified, against a node's
gateway on a real loopback port, with providers on the memory network."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import openai
import pytest
import trio

from modelnet.gateway import Config as GatewayConfig
from modelnet.errors import unwrapping_groups
from modelnet.gateway import Gateway, ListenError
from modelnet.identity import PeerID
from modelnet.models.embedded import EchoBackend, EmbeddedBackend, hashed_embedding
from modelnet.models.openai_http import OpenAIBackend
from modelnet.p2p.node import Config
from modelnet.protocols import reason
from modelnet.testing.openai_upstream import open_upstream

from . import KEY, Slow, open_gateway_network

LIMIT = 30  # seconds: bounds a hang, never a measurement


def embedded(*names: str) -> EmbeddedBackend:
    return EmbeddedBackend(offload=False, models=list(names))


async def test_official_client_lists_chats_streams_and_embeds():
    with trio.fail_after(LIMIT):
        async with open_gateway_network(
            [[embedded("vader-sentiment", "hash-embed")], [embedded("textrank-summary"), EchoBackend()]]
        ) as net:
            sentiment_node, other = net.providers
            ids = {model.id for model in (await net.client.models.list()).data}
            assert {"vader-sentiment", "task:sentiment", "hash-embed", "task:embed", "textrank-summary", "echo", "task:echo"} <= ids
            assert "langid" not in ids  # only what the network serves

            answer = await net.client.chat.completions.create(
                model="task:sentiment", messages=[{"role": "user", "content": "What a wonderful, happy day!"}], temperature=0.3
            )
            assert json.loads(answer.choices[0].message.content)["label"] == "positive"
            assert answer.model == "vader-sentiment" and answer.choices[0].finish_reason == "stop"
            assert answer.usage is None  # no token counts are invented
            extension = answer.model_extra["modelnet"]
            assert extension["provider"] == str(sentiment_node.peer_id) and not extension["local"]
            assert extension["usage"]["input_bytes"] == len("What a wonderful, happy day!")
            receipt = reason.open_receipt(base64.b64decode(extension["receipt"]), provider=PeerID.from_base58(extension["provider"]))
            assert receipt.model == "vader-sentiment"

            text = "streams come in words through the network"
            stream = await net.client.chat.completions.create(
                model="echo", messages=[{"role": "user", "content": text}], stream=True
            )
            chunks = [chunk async for chunk in stream]
            assert chunks[0].choices[0].delta.role == "assistant"
            pieces = [c.choices[0].delta.content for c in chunks[1:-1]]
            assert len(pieces) == len(text.split()) and "".join(pieces) == text
            assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].model == "echo"
            assert len({c.id for c in chunks}) == 1

            inputs = ["the cat sat on the mat", "kademlia routing tables"]
            embeddings = await net.client.embeddings.create(model="hash-embed", input=inputs)  # base64 by default
            for item, text in zip(embeddings.data, inputs):
                assert item.embedding == pytest.approx(hashed_embedding(text), abs=1e-6)
            assert embeddings.model == "hash-embed"

            document = "Modelnet connects models. It uses a DHT to find them. The sky is blue today. Cats sleep."
            completion = await net.client.completions.create(
                model="task:summarize", prompt=document, extra_body={"modelnet": {"params": {"sentences": 1}}}
            )
            assert completion.choices[0].text in document and completion.choices[0].text.count(".") == 1
            assert completion.model == "textrank-summary"


async def test_raw_http_event_stream_and_float_embeddings_match_openai_framing():
    with trio.fail_after(LIMIT):
        async with open_gateway_network([[EchoBackend(), embedded("hash-embed")]]) as net:
            headers = {"Authorization": f"Bearer {KEY}"}
            async with httpx.AsyncClient(base_url=net.url, headers=headers) as http:
                body = {"model": "echo", "prompt": "one two", "stream": True}
                async with http.stream("POST", "/v1/completions", json=body) as response:
                    assert response.status_code == 200
                    assert response.headers["content-type"].startswith("text/event-stream")
                    raw = b"".join([piece async for piece in response.aiter_bytes()])
                events = raw.split(b"\n\n")
                assert events[-2:] == [b"data: [DONE]", b""]
                decoded = [json.loads(e.removeprefix(b"data: ")) for e in events[:-2]]
                assert all(e.startswith(b"data: ") for e in events[:-2])
                assert [d["choices"][0]["text"] for d in decoded] == ["one ", "two", ""]
                assert {d["object"] for d in decoded} == {"text_completion"}
                assert decoded[-1]["choices"][0]["finish_reason"] == "stop" and "modelnet" in decoded[-1]

                response = await http.post("/v1/embeddings", json={"model": "task:embed", "input": "hello", "encoding_format": "float"})
                assert response.json()["data"][0]["embedding"] == pytest.approx(hashed_embedding("hello"))
                response = await http.post("/v1/embeddings", json={"model": "task:embed", "input": "hello", "dimensions": 3})
                assert response.status_code == 400 and response.json()["error"]["param"] == "dimensions"

                for path, method in (("/v1/nothing", "GET"), ("/v1/chat/completions", "GET")):
                    response = await http.request(method, path)
                    assert response.status_code in (404, 405) and set(response.json()["error"]) == {"message", "type", "param", "code"}
                response = await http.post("/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
                assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]


async def test_errors_follow_openai_status_codes():
    busy = ([EchoBackend()], Config(max_concurrent_requests=0))  # refuses every request as overloaded
    with trio.fail_after(LIMIT):
        async with open_gateway_network([[embedded("vader-sentiment")], [EchoBackend(delay=5.0)]]) as net:
            client = net.client
            user = [{"role": "user", "content": "hello there"}]
            with pytest.raises(openai.NotFoundError) as missing:
                await client.chat.completions.create(model="no-such-model", messages=user)
            assert missing.value.code == "model_not_found" and missing.value.param == "model"
            with pytest.raises(openai.APIStatusError) as nobody:
                await client.chat.completions.create(model="task:translate", messages=user)
            assert nobody.value.status_code == 503 and nobody.value.code == "no_provider"
            with pytest.raises(openai.BadRequestError) as empty:  # the provider refuses blank input
                await client.chat.completions.create(model="vader-sentiment", messages=[{"role": "user", "content": "   "}])
            assert empty.value.code == "invalid_input"
            with pytest.raises(openai.BadRequestError) as unknown_param:
                await client.chat.completions.create(
                    model="vader-sentiment", messages=user, extra_body={"modelnet": {"params": {"colour": "red"}}}
                )
            assert "colour" in unknown_param.value.message
            with pytest.raises(openai.BadRequestError) as two_answers:
                await client.chat.completions.create(model="echo", messages=user, n=2)
            assert two_answers.value.param == "n"
            with pytest.raises(openai.APIStatusError) as late:
                await client.chat.completions.create(model="echo", messages=user, extra_body={"modelnet": {"timeout": 0.5}})
            assert late.value.status_code == 504 and late.value.code == "deadline_exceeded"
            with pytest.raises(openai.APIStatusError) as broken:
                await client.chat.completions.create(
                    model="echo", messages=user, extra_body={"modelnet": {"params": {"fail": "before-first-chunk"}}}
                )
            assert broken.value.status_code == 502 and broken.value.code == "provider_failed"
        async with open_gateway_network([busy]) as net:
            with pytest.raises(openai.RateLimitError) as overloaded:
                await net.client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "hi"}])
            assert overloaded.value.code == "overloaded"


async def test_mid_stream_failure_and_disconnect():
    slow = Slow()
    with trio.fail_after(LIMIT):
        async with open_gateway_network([[EchoBackend()], [slow]]) as net:
            stream = await net.client.chat.completions.create(
                model="echo", messages=[{"role": "user", "content": "one two three"}], stream=True,
                extra_body={"modelnet": {"params": {"fail": "after-first-chunk"}}},
            )  # fmt: skip
            received = []
            with pytest.raises(openai.APIError, match="failed mid-answer"):
                async for chunk in stream:
                    received.append(chunk.choices[0].delta.content)
            assert received == ["", "one "]

            # A client that goes away cancels the provider's work.
            body = {"model": "slow-chat", "messages": [{"role": "user", "content": "go"}], "stream": True}
            async with httpx.AsyncClient(base_url=net.url, headers={"Authorization": f"Bearer {KEY}"}) as http:
                async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                    async for line in response.aiter_lines():
                        if "thinking" in line:
                            break
            await slow.cancelled.wait()


async def test_api_keys_guard_the_gateway_and_beyond_loopback_they_are_required():
    config = GatewayConfig(port=0, api_keys=frozenset({KEY}))
    with trio.fail_after(LIMIT):
        async with open_gateway_network([[EchoBackend()]], gateway_config=config) as net:
            assert (await net.client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "ok"}])).choices
            async with openai.AsyncOpenAI(base_url=net.url + "/v1", api_key="sk-wrong-key-000000000", max_retries=0) as wrong:
                with pytest.raises(openai.AuthenticationError) as denied:
                    await wrong.models.list()
            assert denied.value.code == "invalid_api_key"
            async with httpx.AsyncClient(base_url=net.url) as http:
                response = await http.get("/v1/models")
            assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    with pytest.raises(ListenError, match="without API keys"):
        GatewayConfig(host="0.0.0.0")
    GatewayConfig(host="0.0.0.0", api_keys=frozenset({KEY}))
    GatewayConfig(host="::1")


async def test_a_port_in_use_is_a_clear_error():
    with trio.fail_after(LIMIT):
        async with open_gateway_network([[EchoBackend()]]) as net:
            port = int(net.url.rsplit(":", 1)[1])
            with pytest.raises(ListenError, match="cannot listen"):
                with unwrapping_groups():
                    async with trio.open_nursery() as nursery:
                        await nursery.start(Gateway(net.node, GatewayConfig(port=port)).serve)


async def test_plans_and_models_of_the_gateway_node_itself():
    async def triage(text: str, on_chunk) -> tuple[Any, list[str]]:
        # A real plan: two routed steps, each streamed as one chunk.
        sentiment = await net.node.ask("sentiment", text)
        on_chunk(sentiment.output["label"] + " ")
        summary = await net.node.ask("summarize", text, {"sentences": 1})
        on_chunk(summary.output)
        return {"sentiment": sentiment.output["label"], "summary": summary.output}, [sentiment.output["label"] + " ", summary.output]

    with trio.fail_after(LIMIT):
        async with open_gateway_network(
            [[embedded("vader-sentiment", "textrank-summary")]],
            gateway_backends=[embedded("yake-keywords")],
            plans={"triage": triage},
        ) as net:
            listed = {m.id: m for m in (await net.client.models.list()).data}
            assert listed["triage"].model_extra["modelnet"]["kind"] == "plan"
            assert listed["yake-keywords"].model_extra["modelnet"]["local"] is True
            text = "I love this network. It routes requests well."
            stream = await net.client.chat.completions.create(model="triage", messages=[{"role": "user", "content": text}], stream=True)
            pieces = [c.choices[0].delta.content async for c in stream if c.choices[0].delta.content]
            assert pieces[0] == "positive " and "".join(pieces[1:]) in text
            answer = await net.client.chat.completions.create(model="triage", messages=[{"role": "user", "content": text}])
            assert answer.model == "triage" and answer.choices[0].message.content.startswith("positive")

            # The gateway node's own model answers here, with nothing sent over the network.
            keywords = await net.client.chat.completions.create(
                model="task:keywords", messages=[{"role": "user", "content": "Kademlia tables hold peers. Kademlia lookups iterate."}]
            )
            assert keywords.model_extra["modelnet"]["local"] is True
            assert "kademlia" in keywords.choices[0].message.content.lower()


async def test_openai_backend_upstream_through_the_network():
    with trio.fail_after(LIMIT):
        async with open_upstream(["tiny-chat", "tiny-embed"], api_key="sk-upstream") as upstream:
            backend = OpenAIBackend(upstream.base_url, ["tiny-chat", "tiny-embed"], api_key="sk-upstream")
            async with open_gateway_network([[backend]]) as net:
                conversation = [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "hello"},
                    {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "what is 2 + 3"},
                ]
                async with openai.AsyncOpenAI(base_url=upstream.base_url, api_key="sk-upstream", max_retries=0) as direct:
                    expected = await direct.chat.completions.create(model="tiny-chat", messages=conversation)
                    expected_vector = (await direct.embeddings.create(model="tiny-embed", input="hello world")).data[0].embedding
                stream = await net.client.chat.completions.create(model="tiny-chat", messages=conversation, stream=True, max_tokens=50)
                pieces = [c.choices[0].delta.content async for c in stream if c.choices and c.choices[0].delta.content]
                assert len(pieces) > 1 and "".join(pieces) == expected.choices[0].message.content
                forwarded = upstream.requests[-1].body
                assert forwarded["messages"] == conversation and forwarded["max_tokens"] == 50
                vector = (await net.client.embeddings.create(model="tiny-embed", input="hello world")).data[0].embedding
                assert vector == pytest.approx(expected_vector, abs=1e-6)
