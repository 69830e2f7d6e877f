"""Tier 5: ``modelnet node --http`` and ``modelnet gateway`` as subprocesses, called over HTTP."""

from __future__ import annotations

import base64
import json
import subprocess
import time

import httpx
import pytest
import trio

from modelnet.identity import PeerID
from modelnet.protocols import plan

from .test_cli import LIMIT, MODELNET, env_for, run

pytestmark = pytest.mark.subprocess


class Lines:
    """Lines of one output stream of a running process."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.buffer = b""

    async def until(self, prefix: str) -> str:
        """The first line starting with ``prefix``, without it."""
        with trio.fail_after(LIMIT):
            while True:
                while b"\n" not in self.buffer:
                    data = await self.stream.receive_some()
                    if not data:
                        raise AssertionError(f"the process ended before printing {prefix!r}")
                    self.buffer += data
                line, _, self.buffer = self.buffer.partition(b"\n")
                if line.decode().startswith(prefix):
                    return line.decode().removeprefix(prefix)


async def start(nursery, home, *args) -> tuple[trio.Process, Lines, Lines]:
    async def run_process(task_status=trio.TASK_STATUS_IGNORED):
        await trio.run_process(
            MODELNET + list(args), env=env_for(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            check=False, task_status=task_status,
        )  # fmt: skip

    process = await nursery.start(run_process)
    return process, Lines(process.stdout), Lines(process.stderr)


PLAN = """
pipeline:
  - step: {capability: summarize, params: {sentences: 1}}
  - step: sentiment
"""


async def test_node_with_http_and_a_gateway_light_client(tmp_path):
    await run(["init", "--listen", "/ip4/127.0.0.1/tcp/0"], tmp_path / "a", check=True)
    plan_file = tmp_path / "brief.yaml"
    plan_file.write_text(PLAN)
    async with trio.open_nursery() as nursery:
        _, out, err = await start(
            nursery, tmp_path / "a", "node", "--model", "embedded:vader-sentiment", "--model", "embedded:textrank-summary",
            "--http", "127.0.0.1:0", "--serve-private",
        )  # fmt: skip
        address = await out.until("listening on ")
        assert "every HTTP client acts with this node's authority" in await err.until("--serve-private: ")
        node_url = await err.until("gateway listening on ")
        _, _, gateway_err = await start(
            nursery, tmp_path / "g", "gateway", "--bootstrap", address, "--http", "127.0.0.1:0", "--plan", f"brief={plan_file}"
        )
        assert await gateway_err.until("plan brief ") == "served as model 'brief'"
        gateway_url = await gateway_err.until("gateway listening on ")

        chat = {"model": "task:sentiment", "messages": [{"role": "user", "content": "I love this wonderful network"}]}
        async with httpx.AsyncClient(timeout=LIMIT) as http:
            local = (await http.post(node_url + "/chat/completions", json=chat)).json()
            assert local["model"] == "vader-sentiment" and local["modelnet"]["local"] is True
            listed = {m["id"] for m in (await http.get(gateway_url + "/models")).json()["data"]}
            assert {"vader-sentiment", "task:sentiment"} <= listed
            routed = (await http.post(gateway_url + "/chat/completions", json=chat)).json()
            assert '"label": "positive"' in routed["choices"][0]["message"]["content"]
            assert routed["modelnet"]["local"] is False and address.endswith(routed["modelnet"]["provider"])
            cross_site = await http.post(gateway_url + "/chat/completions", content=json.dumps(chat), headers={"Content-Type": "text/plain"})
            assert cross_site.status_code == 415 and cross_site.json()["error"]["code"] == "unsupported_media_type"
            missing = await http.post(gateway_url + "/chat/completions", json=dict(chat, model="nobody-serves-this"))
            assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"

            text = "I love this wonderful network. It routes requests between models. The weather is mild."
            planned = (await http.post(gateway_url + "/chat/completions", json=dict(chat, model="brief", messages=[{"role": "user", "content": text}]))).json()
            assert planned["model"] == "brief" and json.loads(planned["choices"][0]["message"]["content"])["label"] == "positive"
            trace = plan.Trace.decode(base64.b64decode(planned["modelnet"]["trace"]))
            plan.verify_trace(trace, asker=PeerID.from_base58(planned["modelnet"]["asker"]), now=time.time())
            assert [step.capability for step in trace.steps] == ["summarize", "sentiment"]
            assert {str(step.provider) for step in trace.steps} == {address.rsplit("/", 1)[1]}
        nursery.cancel_scope.cancel()


async def test_gateway_refuses_to_listen_beyond_loopback_without_keys(tmp_path):
    address = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWEDgAXHPMYWqnztY5bpwFv77G1vxKa4Gd5res9c6ZoPLj"
    refused = await run(["gateway", "--bootstrap", address, "--http", "0.0.0.0:0"], tmp_path)
    assert refused.returncode == 2
    err = refused.stderr.decode()
    assert err.startswith("modelnet: error:") and "without API keys" in err and err.count("\n") == 1
    bad = await run(["gateway", "--bootstrap", address, "--http", "localhost"], tmp_path)
    assert bad.returncode == 2 and "HOST:PORT" in bad.stderr.decode()

    broken = tmp_path / "broken.yaml"
    broken.write_text("ensemble: {step: sentiment, k: 2, aggregate: mean}\n")
    for args, reason in (
        (["--plan", f"bad={broken}"], "aggregate"),
        (["--plan", f"task:x={broken}"], "plan name"),
        (["--plan", "nofile"], "NAME=FILE"),
        (["--plan", f"missing={tmp_path / 'missing.yaml'}"], "cannot read"),
    ):
        refused = await run(["gateway", "--bootstrap", address, "--http", "127.0.0.1:0", *args], tmp_path)
        err = refused.stderr.decode()
        assert refused.returncode == 2 and err.startswith("modelnet: error: --plan") and err.count("\n") == 1 and reason in err, err
    await run(["init", "--listen", "/ip4/127.0.0.1/tcp/0"], tmp_path / "n", check=True)
    for option in (["--plan", f"bad={broken}"], ["--serve-private"], ["--allowed-host", "api.example.org"]):
        alone = await run(["node", "--model", "echo", *option], tmp_path / "n")
        assert alone.returncode == 2 and "add --http" in alone.stderr.decode()
