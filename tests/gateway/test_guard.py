"""What the gateway refuses and stops: browsers led by another site (wrong Host, a
non-JSON body, a foreign Origin), requests beyond its concurrency, work whose client left,
and the node's authority (private models, organisation memberships) lent to its clients."""

from __future__ import annotations

import json
from typing import Any, AsyncIterator, Mapping

import httpx
import openai
import pytest
import trio

from modelnet.gateway import Config as GatewayConfig
from modelnet.gateway import Gateway
from modelnet.gateway.guard import Guard
from modelnet.identity import Membership, issue_certificate, records_key
from modelnet.models.base import Backend, Chunk, ModelInfo, Output
from modelnet.models.embedded import EchoBackend
from modelnet.protocols.access import AccessPolicy
from modelnet.testing import EPOCH, ScriptedBackend, seeded_key

from . import GATEWAY, KEY, Slow, open_gateway_network

LIMIT = 30  # seconds: bounds a hang, never a measurement
ORG = seeded_key(200, seed=7)
POLICY = {"secret-echo": AccessPolicy(orgs=(ORG.peer_id,))}
CHAT = {"model": "task:echo", "messages": [{"role": "user", "content": "from evil.example"}]}


class Models(Backend):
    """A public and an organisation-private model; records what it ran."""

    def __init__(self, label: str) -> None:
        self.name = f"models-{label}"
        self.label = label
        self.served: list[str] = []

    def models(self) -> list[ModelInfo]:
        return [ModelInfo("open-echo", "echo"), ModelInfo("secret-echo", "secret-task")]

    async def run(self, model: str, text: str, params: Mapping[str, Any]) -> AsyncIterator[Chunk | Output]:
        self.served.append(model)
        yield Output(f"{self.label}/{model}:{text}")


def membership(index: int) -> Membership:
    # Long-lived: the gateway network's wall clock follows trio's real clock.
    cert = issue_certificate(ORG, "acme", seeded_key(index).peer_id, now=EPOCH, expires=EPOCH + 3650 * 86400)
    return Membership(cert, records_key(ORG))


async def test_browser_style_requests_are_refused_and_run_nothing():
    echo = ScriptedBackend("echo")
    with trio.fail_after(LIMIT):
        async with open_gateway_network([[echo]]) as net:
            port = net.url.rsplit(":", 1)[1]
            body = json.dumps(CHAT).encode()
            json_type = {"Content-Type": "application/json"}
            async with httpx.AsyncClient(base_url=net.url) as http:
                refused = {
                    # the review's demo: a cross-site "simple" request after DNS rebinding
                    "demo": {"Content-Type": "text/plain", "Origin": "http://evil.example", "Host": "evil.example:8080"},
                    "text/plain": {"Content-Type": "text/plain"},
                    "form": {"Content-Type": "application/x-www-form-urlencoded"},
                    "no type": {},
                    "rebound host": {**json_type, "Host": f"evil.example:{port}"},
                    "foreign origin": {**json_type, "Origin": "http://evil.example"},
                    "other local origin": {**json_type, "Origin": "http://localhost:3000"},
                    "opaque origin": {**json_type, "Origin": "null"},
                }
                statuses = {}
                for name, headers in refused.items():
                    response = await http.post("/v1/chat/completions", content=body, headers=headers)
                    assert set(response.json()["error"]) == {"message", "type", "param", "code"}, name
                    statuses[name] = (response.status_code, response.json()["error"]["code"])
                assert statuses == {
                    "demo": (400, "invalid_host"),
                    "text/plain": (415, "unsupported_media_type"),
                    "form": (415, "unsupported_media_type"),
                    "no type": (415, "unsupported_media_type"),
                    "rebound host": (400, "invalid_host"),
                    "foreign origin": (403, "forbidden_origin"),
                    "other local origin": (403, "forbidden_origin"),
                    "opaque origin": (403, "forbidden_origin"),
                }
                # A rebound page cannot read the model list either.
                response = await http.get("/v1/models", headers={"Host": "evil.example"})
                assert response.status_code == 400
                assert echo.started == 0  # nothing was routed

                # Loopback names, the gateway's own origin, and a charset are fine.
                for headers in (
                    {"Content-Type": "application/json; charset=utf-8"},
                    {**json_type, "Host": f"localhost:{port}", "Origin": f"http://localhost:{port}"},
                    {**json_type, "Host": f"[::1]:{port}"},
                ):
                    response = await http.post("/v1/chat/completions", content=body, headers=headers)
                    assert response.status_code == 200, response.text
            assert echo.started == 3
            # The official client is unaffected.
            answer = await net.client.chat.completions.create(model="task:echo", messages=CHAT["messages"])
            assert answer.choices[0].message.content == "echo:from evil.example"


@pytest.mark.parametrize(
    ("host", "keys", "allowed", "accepted", "refused"),
    [
        ("127.0.0.1", (), (), ["127.0.0.1:1", "localhost", "LOCALHOST.:80", "[::1]:8080"], ["evil.example", "10.0.0.1", "", "[::1"]),
        ("::1", (), (), ["[::1]:8080", "localhost:1"], ["evil.example:8080"]),
        ("0.0.0.0", (KEY,), ("api.example.org",), ["192.0.2.7:8080", "[2001:db8::1]:80", "api.example.org"], ["evil.example"]),
        ("192.0.2.7", (KEY,), (), ["192.0.2.7:8080"], ["localhost", "127.0.0.1", "rebind.example:8080"]),
    ],
)
def test_host_names_a_gateway_accepts(host, keys, allowed, accepted, refused):
    guard = Guard(None, GatewayConfig(host=host, api_keys=frozenset(keys), allowed_hosts=allowed))
    assert [h for h in accepted if not guard.host_allowed(h)] == []
    assert [h for h in refused if guard.host_allowed(h)] == []


async def _post_until_cancelled(url: str, path: str, body: dict[str, Any], *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY}"}) as http:
        task_status.started()
        await http.post(path, json=body)
    raise AssertionError("the request was answered")


async def test_a_client_that_disconnects_cancels_non_streamed_work():
    remote, local, embed = Slow(), Slow("slow-local"), Slow("slow-embed", "embed")
    with trio.fail_after(LIMIT):
        async with open_gateway_network([[remote], [embed]], gateway_backends=[local]) as net:
            for backend, path, body in (
                (remote, "/v1/chat/completions", {"model": "slow-chat", "messages": [{"role": "user", "content": "go"}]}),
                (local, "/v1/completions", {"model": "slow-local", "prompt": "go"}),
                (embed, "/v1/embeddings", {"model": "slow-embed", "input": ["a", "b", "c"]}),
            ):
                async with trio.open_nursery() as nursery:
                    await nursery.start(_post_until_cancelled, net.url, path, body)
                    await backend.started.wait()
                    nursery.cancel_scope.cancel()  # the client hangs up
                await backend.cancelled.wait()  # the model (the provider's, or the gateway node's) stops


async def test_requests_beyond_the_gateway_limit_are_told_to_retry():
    slow = Slow()
    config = GatewayConfig(port=0, max_concurrent_requests=1)
    with trio.fail_after(LIMIT):
        async with open_gateway_network([[slow, EchoBackend()]], gateway_config=config) as net:
            user = [{"role": "user", "content": "hi"}]
            async with trio.open_nursery() as nursery:
                body = {"model": "slow-chat", "messages": user}
                await nursery.start(_post_until_cancelled, net.url, "/v1/chat/completions", body)
                await slow.started.wait()
                with pytest.raises(openai.RateLimitError) as busy:
                    await net.client.chat.completions.create(model="echo", messages=user)
                assert busy.value.code == "gateway_busy" and busy.value.response.headers["retry-after"] == "1"
                nursery.cancel_scope.cancel()
            await slow.cancelled.wait()  # its slot is free again
            answer = await net.client.chat.completions.create(model="echo", messages=user)
            assert answer.choices[0].message.content == "hi"


async def _ids(client: openai.AsyncOpenAI) -> set[str]:
    return {model.id for model in (await client.models.list()).data}


async def test_the_nodes_private_models_are_not_served_unless_the_operator_opts_in():
    models = Models("gw")
    with trio.fail_after(LIMIT):
        async with open_gateway_network(
            [[EchoBackend()]], gateway_backends=[models], policies_for=lambda i: POLICY if i == GATEWAY else {}
        ) as net:
            user = [{"role": "user", "content": "the plan"}]
            ids = await _ids(net.client)
            assert "open-echo" in ids and not {"secret-echo", "task:secret-task"} & ids
            with pytest.raises(openai.NotFoundError):
                await net.client.chat.completions.create(model="secret-echo", messages=user)
            with pytest.raises(openai.APIStatusError) as nobody:  # nor reached through its capability
                await net.client.chat.completions.create(model="task:secret-task", messages=user)
            assert nobody.value.status_code == 503
            assert models.served == []
            answer = await net.client.chat.completions.create(model="open-echo", messages=user)
            assert answer.choices[0].message.content == "gw/open-echo:the plan"

            async with trio.open_nursery() as nursery:
                opted_in = Gateway(net.node, GatewayConfig(port=0, serve_private=True))
                url = await nursery.start(opted_in.serve)
                async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0) as client:
                    assert {"secret-echo", "task:secret-task"} <= await _ids(client)
                    answer = await client.chat.completions.create(model="secret-echo", messages=user)
                    assert answer.choices[0].message.content == "gw/open-echo:the plan".replace("open", "secret")
                nursery.cancel_scope.cancel()


async def test_gateway_clients_do_not_use_the_nodes_memberships_unless_the_operator_opts_in():
    provider = Models("p")
    with trio.fail_after(LIMIT):
        async with open_gateway_network(
            [[provider]],
            memberships_for=lambda i: [membership(i)] if i in (1, GATEWAY) else [],
            policies_for=lambda i: POLICY if i == 1 else {},
        ) as net:
            user = [{"role": "user", "content": "merger plan"}]
            # The node itself, a member, reaches the organisation's model...
            assert (await net.node.ask("secret-task", "merger plan")).output == "p/secret-echo:merger plan"
            # ...its gateway's clients do not: they are anonymous askers.
            assert "secret-echo" not in await _ids(net.client)
            with pytest.raises(openai.NotFoundError):
                await net.client.chat.completions.create(model="secret-echo", messages=user)
            with pytest.raises(openai.APIStatusError) as nobody:
                await net.client.chat.completions.create(model="task:secret-task", messages=user)
            assert nobody.value.status_code == 503
            assert provider.served == ["secret-echo"]  # only the node's own call
            answer = await net.client.chat.completions.create(model="open-echo", messages=user)
            assert answer.choices[0].message.content == "p/open-echo:merger plan"

            async with trio.open_nursery() as nursery:
                url = await nursery.start(Gateway(net.node, GatewayConfig(port=0, serve_private=True)).serve)
                async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0) as client:
                    answer = await client.chat.completions.create(model="secret-echo", messages=user)
                    assert answer.choices[0].message.content == "p/secret-echo:merger plan"
                    answer = await client.chat.completions.create(model="task:secret-task", messages=user)
                    assert answer.model_extra["modelnet"]["provider"] == str(net.providers[0].peer_id)
                    assert {"secret-echo", "task:secret-task"} <= await _ids(client)  # a task asked for is listed
                nursery.cancel_scope.cancel()


async def test_plan_steps_do_not_use_the_nodes_memberships_unless_the_operator_opts_in():
    from modelnet.protocols.plan import Step

    provider = Models("p")
    plans = {"secret-plan": Step("secret-task")}
    user = [{"role": "user", "content": "merger plan"}]
    with trio.fail_after(LIMIT):
        async with open_gateway_network(
            [[provider]],
            memberships_for=lambda i: [membership(i)] if i in (1, GATEWAY) else [],
            policies_for=lambda i: POLICY if i == 1 else {},
        ) as net:
            async with trio.open_nursery() as nursery:
                for serve_private in (False, True):
                    gateway = Gateway(net.node, GatewayConfig(port=0, serve_private=serve_private), plans=plans)
                    url = await nursery.start(gateway.serve)
                    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0) as client:
                        if not serve_private:  # the step is asked anonymously: no provider it may use
                            with pytest.raises(openai.APIStatusError) as failed:
                                await client.chat.completions.create(model="secret-plan", messages=user)
                            assert failed.value.status_code == 502
                            assert provider.served == []
                        else:
                            answer = await client.chat.completions.create(model="secret-plan", messages=user)
                            assert answer.choices[0].message.content == "p/secret-echo:merger plan"
                nursery.cancel_scope.cancel()
