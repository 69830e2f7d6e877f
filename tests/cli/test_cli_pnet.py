"""Tier 4: a private swarm (``--swarm-key``) from the command line, as a user runs it."""

from __future__ import annotations

import json

import pytest
import trio

from .test_cli import run, start_node
from .test_cli_org import one_line_error

pytestmark = pytest.mark.subprocess


async def test_a_private_swarm_admits_its_key_and_refuses_the_rest_with_the_reason(tmp_path):
    key, other = tmp_path / "acme.swarm.key", tmp_path / "other.swarm.key"
    made = await run(["swarm-key", str(key)], tmp_path, check=True)
    assert "written" in made.stdout.decode() and key.stat().st_mode & 0o777 == 0o600
    secret = key.read_bytes()
    one_line_error(await run(["swarm-key", str(key)], tmp_path), 2)  # never overwritten
    assert key.read_bytes() == secret
    await run(["swarm-key", str(other)], tmp_path, check=True)
    client = tmp_path / "client"

    async with trio.open_nursery() as nursery:
        first = await start_node(nursery, tmp_path / "a", "--model", "echo", "--swarm-key", str(key))
        second = await start_node(
            nursery, tmp_path / "b", "--bootstrap", first.address, "--model", "embedded:vader-sentiment", "--swarm-key", str(key)
        )
        # The two nodes joined each other: each finds and answers through the other.
        found = await run(["find", "echo", "--swarm-key", str(key), "--bootstrap", second.address, "--json"], client)
        assert found.returncode == 0, found.stderr.decode()
        [provider] = json.loads(found.stdout)["providers"]
        assert first.address.endswith(provider["peer_id"])
        asked = await run(
            ["ask", "sentiment", "I love this private network", "--swarm-key", str(key), "--bootstrap", first.address, "--json"],
            client,
        )
        assert asked.returncode == 0, asked.stderr.decode()
        answer = json.loads(asked.stdout)
        assert answer["output"]["label"] == "positive" and second.address.endswith(answer["provider"])

        # Strangers are refused at the handshake, told why, exit 1.
        keyless = one_line_error(await run(["ask", "echo", "hi", "--bootstrap", first.address], client), 1)
        assert "cannot join the network" in keyless and "private swarm" in keyless
        wrong = one_line_error(await run(["ask", "echo", "hi", "--swarm-key", str(other), "--bootstrap", first.address], client), 1)
        assert "cannot join the network" in wrong and "another swarm key" in wrong

        # `org revoke` publishes through the private swarm, with its key only.
        org = tmp_path / "org"
        await run(["org", "create", "acme"], org, check=True)
        member = provider["peer_id"]
        revoked = await run(["org", "revoke", "acme", member, "--bootstrap", first.address, "--swarm-key", str(key)], org)
        assert revoked.returncode == 0, revoked.stderr.decode()
        assert "published to" in revoked.stdout.decode()
        refused = one_line_error(await run(["org", "revoke", "acme", member, "--bootstrap", first.address], org), 1)
        assert "cannot join the network" in refused and "private swarm" in refused
        nursery.cancel_scope.cancel()
