"""Tier 4: `modelnet org …` and `modelnet node --policy`, as a user runs them (subprocesses)."""

from __future__ import annotations

import json
import os

import pytest
import trio

from .test_cli import run, start_node

pytestmark = pytest.mark.subprocess


async def init(home) -> str:
    result = await run(["init", "--listen", "/ip4/127.0.0.1/tcp/0"], home, check=True)
    return result.stdout.decode().split()[1]


async def create_org(home, name="acme") -> str:
    result = await run(["org", "create", name], home, check=True)
    return result.stdout.decode().split()[2]


def one_line_error(result, code: int) -> str:
    """The error line (network commands print progress lines before it)."""
    err = result.stderr.decode()
    assert result.returncode == code, err
    lines = err.splitlines()
    assert err.count("modelnet: error:") == 1 and lines[-1].startswith("modelnet: error:"), err
    return lines[-1]


async def test_create_issue_join_revoke_show(tmp_path):
    org_home, member_home = tmp_path / "org", tmp_path / "member"
    org_id = await create_org(org_home)
    assert (org_home / "orgs" / "acme.key").stat().st_mode & 0o777 == 0o600
    one_line_error(await run(["org", "create", "acme"], org_home), 2)  # never replaced

    member = await init(member_home)
    cert = tmp_path / "m.membership"
    issued = await run(["org", "issue", "acme", "--member", member, "--role", "dev", "--expires", "2d", "--out", str(cert)], org_home, check=True)
    assert member in issued.stdout.decode()
    assert cert.stat().st_mode & 0o777 == 0o600  # it holds the records key

    # a membership for another node is refused where it is installed
    other = await init(tmp_path / "other")
    err = one_line_error(await run(["org", "join", str(cert)], tmp_path / "other"), 2)
    assert member in err and other in err
    garbage = tmp_path / "garbage.membership"
    garbage.write_bytes(os.urandom(200))
    one_line_error(await run(["org", "join", str(garbage)], member_home), 2)

    joined = await run(["org", "join", str(cert)], member_home, check=True)
    assert org_id in joined.stdout.decode()
    shown = json.loads((await run(["org", "show", "--json"], member_home, check=True)).stdout)
    [held] = shown["memberships"]
    assert (held["org"], held["id"], held["member"], held["roles"], held["status"]) == ("acme", org_id, member, ["dev"], "valid")

    await run(["org", "revoke", "acme", other], org_home, check=True)
    revoked = await run(["org", "revoke", "acme", member], org_home, check=True)
    assert "2 revoked" in revoked.stdout.decode() and "not published" in revoked.stdout.decode()
    [owned] = json.loads((await run(["org", "show", "--json"], org_home, check=True)).stdout)["organisations"]
    assert owned["id"] == org_id and owned["revocation_seq"] == 2 and set(owned["revoked"]) == {member, other}


async def test_bad_input_is_one_line_and_exit_2(tmp_path):
    home = tmp_path / "home"
    await init(home)
    one_line_error(await run(["org", "issue", "nope", "--member", "x"], home), 2)
    await create_org(home)
    one_line_error(await run(["org", "issue", "acme", "--member", "not-a-peer"], home), 2)
    node_id = (json.loads((home / "node.key").read_text()))["peer_id"]
    one_line_error(await run(["org", "issue", "acme", "--member", node_id, "--expires", "5y"], home), 2)
    one_line_error(await run(["node", "--policy", "echo=org:nope", "--model", "echo"], home), 2)
    one_line_error(await run(["node", "--policy", "nomodel", "--model", "echo"], home), 2)
    err = one_line_error(await run(["node", "--policy", f"nosuch=peer:{node_id}", "--model", "echo"], home), 2)
    assert "nosuch" in err
    # a group-readable organisation key is refused
    (home / "orgs" / "acme.key").chmod(0o640)
    err = one_line_error(await run(["org", "issue", "acme", "--member", node_id], home), 2)
    assert "chmod 600" in err


async def test_a_member_without_the_role_is_refused_with_the_reason_then_served_with_it(tmp_path):
    provider_home, member_home = tmp_path / "provider", tmp_path / "member"
    provider = await init(provider_home)
    org_id = await create_org(provider_home)
    # the provider is a member too: it publishes the private record under the org's keys
    own = tmp_path / "own.membership"
    await run(["org", "issue", "acme", "--member", provider, "--role", "provider", "--out", str(own)], provider_home, check=True)
    await run(["org", "join", str(own)], provider_home, check=True)
    member = await init(member_home)
    intern = tmp_path / "intern.membership"
    await run(["org", "issue", "acme", "--member", member, "--role", "intern", "--out", str(intern)], provider_home, check=True)
    await run(["org", "join", str(intern)], member_home, check=True)

    async with trio.open_nursery() as nursery:
        node = await start_node(nursery, provider_home, "--model", "echo", "--policy", f"echo=org:{org_id}:role=dev")
        refused = await run(["ask", "echo", "hello there", "--bootstrap", node.address], member_home)
        err = one_line_error(refused, 1)
        assert "forbidden" in err and "missing-role" in err and "dev" in err

        # a stranger does not even find it
        stranger = await run(["ask", "echo", "hello", "--bootstrap", node.address], tmp_path / "stranger")
        one_line_error(stranger, 3)

        dev = tmp_path / "dev.membership"
        await run(["org", "issue", "acme", "--member", member, "--role", "dev", "--out", str(dev)], provider_home, check=True)
        await run(["org", "join", str(dev)], member_home, check=True)
        served = await run(["ask", "echo", "hello there", "--bootstrap", node.address, "--json"], member_home)
        assert served.returncode == 0, served.stderr.decode()
        assert json.loads(served.stdout)["provider"] == provider
        nursery.cancel_scope.cancel()
