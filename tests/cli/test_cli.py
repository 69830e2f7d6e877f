"""Tier 4: the `modelnet` command as a user runs it, in subprocesses on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import trio

pytestmark = pytest.mark.subprocess

MODELNET = [sys.executable, "-m", "modelnet"]
LIMIT = 60  # seconds: bounds a hang, never a measurement


def env_for(home) -> dict[str, str]:
    env = dict(os.environ)
    env["MODELNET_HOME"] = str(home)
    env.pop("MODELNET_BOOTSTRAP", None)
    return env


async def run(args, home, *, check=False) -> subprocess.CompletedProcess:
    with trio.fail_after(LIMIT):
        return await trio.run_process(
            MODELNET + args, env=env_for(home), capture_stdout=True, capture_stderr=True, check=check
        )


class RunningNode:
    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.address: str | None = None
        self._buffer = b""

    async def read_line(self) -> str:
        while b"\n" not in self._buffer:
            data = await self.process.stdout.receive_some()
            if not data:
                raise AssertionError("node exited before it was ready")
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    async def wait_ready(self) -> None:
        with trio.fail_after(LIMIT):
            while (line := await self.read_line()) != "ready":
                if line.startswith("listening on ") and self.address is None:
                    self.address = line.removeprefix("listening on ")


async def start_node(nursery, home, *extra) -> RunningNode:
    await run(["init", "--listen", "/ip4/127.0.0.1/tcp/0"], home, check=True)

    async def run_node(task_status=trio.TASK_STATUS_IGNORED):
        await trio.run_process(
            MODELNET + ["node", *extra],
            env=env_for(home),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            check=False,
            task_status=task_status,
        )

    process = await nursery.start(run_node)
    node = RunningNode(process)
    await node.wait_ready()
    return node


async def test_three_nodes_then_find_and_ask_from_a_fourth_process(tmp_path):
    async with trio.open_nursery() as nursery:
        first = await start_node(nursery, tmp_path / "a", "--model", "embedded:vader-sentiment")
        second = await start_node(nursery, tmp_path / "b", "--bootstrap", first.address, "--model", "embedded:langid")
        await start_node(nursery, tmp_path / "c", "--bootstrap", first.address, "--model", "embedded:vader-sentiment")
        client = tmp_path / "client"

        found = await run(["find", "sentiment", "--bootstrap", second.address, "--json"], client)
        assert found.returncode == 0, found.stderr.decode()
        providers = json.loads(found.stdout)["providers"]
        assert len(providers) == 2
        assert all(p["models"][0]["name"] == "vader-sentiment" for p in providers)

        asked = await run(
            ["ask", "sentiment", "I love this wonderful network", "--bootstrap", second.address, "--json"], client
        )
        assert asked.returncode == 0, asked.stderr.decode()
        answer = json.loads(asked.stdout)
        assert answer["output"]["label"] == "positive"
        assert answer["provider"] in {p["peer_id"] for p in providers}

        human = await run(["ask", "language-id", "Ceci est une phrase en français", "--bootstrap", first.address], client)
        assert human.returncode == 0, human.stderr.decode()
        assert human.stdout.decode().startswith("fr")

        missing = await run(["ask", "translate", "hello", "--bootstrap", first.address], client)
        assert missing.returncode == 3
        assert missing.stderr.decode().count("modelnet: error:") == 1 and "no provider" in missing.stderr.decode()

        empty = await run(["ask", "sentiment", "  ", "--bootstrap", first.address], client)
        assert empty.returncode == 2 and "empty" in empty.stderr.decode()
        nursery.cancel_scope.cancel()


async def test_clear_errors_for_bad_and_unreachable_bootstrap(tmp_path):
    bad = await run(["find", "sentiment", "--bootstrap", "/ip4/127.0.0.1/tcp/1"], tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.decode().startswith("modelnet: error:") and bad.stderr.decode().count("\n") == 1

    # A real peer id at an address where nobody listens.
    ghost = (await run(["init"], tmp_path / "ghost", check=True)).stdout.decode().split()[1]
    with trio.socket.socket() as sock:  # take a free port, then release it: nothing listens there
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    unreachable = await run(
        ["ask", "sentiment", "hi", "--bootstrap", f"/ip4/127.0.0.1/tcp/{port}/p2p/{ghost}", "--timeout", "10"], tmp_path
    )
    assert unreachable.returncode == 1, unreachable.stderr.decode()
    err = unreachable.stderr.decode()
    assert err.startswith("modelnet: error:") and err.count("\n") == 1 and "join" in err

    no_bootstrap = await run(["find", "sentiment"], tmp_path / "nowhere")
    assert no_bootstrap.returncode == 2 and "bootstrap" in no_bootstrap.stderr.decode()


async def test_init_writes_a_private_key_file_and_keeps_it(tmp_path):
    result = await run(["init"], tmp_path / "home", check=True)
    peer_id = result.stdout.decode().split()[1]
    assert peer_id.startswith("12D3KooW")
    key_file = tmp_path / "home" / "node.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    again = await run(["init"], tmp_path / "home", check=True)
    assert peer_id in again.stdout.decode()


async def test_demo_runs_end_to_end(tmp_path):
    result = await run(["demo", "--json"], tmp_path)
    assert result.returncode == 0, result.stderr.decode()
    report = json.loads(result.stdout)
    by_capability: dict[str, list] = {}
    for r in report["requests"]:
        by_capability.setdefault(r["capability"], []).append(r)
        assert r["providers_found"] == 2
    assert by_capability["sentiment"][0]["answer"]["label"] == "positive"
    assert by_capability["sentiment"][1]["answer"]["label"] == "negative"
    assert by_capability["language-id"][0]["answer"]["language"] == "fr"
    assert by_capability["language-id"][1]["answer"]["language"] == "de"
    assert report["requests"][2]["answer"]["keywords"]
    pipeline, vote = report["plans"]
    assert [step.split("@")[0] for step in pipeline["steps"]] == ["summarize", "sentiment"]
    assert pipeline["answer"]["label"] == "positive" and pipeline["trace_verified"]  # the summary keeps the praise
    # the ensemble asked two distinct providers and both voted "positive"
    assert len(set(vote["steps"])) == 2 and vote["answer"]["label"] == "positive"
    # the private model: a member finds and calls it, an outsider cannot even find it
    private = report["private"]
    assert private["member_found"] == 1 and private["member_answer_dimensions"] == 256
    assert private["outsider_found"] == 0 and "no provider" in private["outsider_refused"]
