"""Tier 4: `modelnet ask --plan` as a user runs it, in subprocesses on loopback."""

from __future__ import annotations

import base64
import json
import time

import pytest
import trio

from modelnet.identity import PeerID
from modelnet.protocols import plan as P

from .test_cli import run, start_node

pytestmark = pytest.mark.subprocess

PLAN = """\
# summarise, then three distinct providers vote on the mood
pipeline:
  - step: {capability: summarize, params: {sentences: 1}}
  - ensemble:
      step: sentiment
      k: 3
      aggregate: {vote: {field: label}}
"""


async def test_ask_with_a_plan_file_prints_a_trace_that_verifies(tmp_path):
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(PLAN)
    async with trio.open_nursery() as nursery:
        first = await start_node(nursery, tmp_path / "a", "--model", "embedded:textrank-summary", "--model", "embedded:vader-sentiment")
        await start_node(nursery, tmp_path / "b", "--bootstrap", first.address, "--model", "embedded:vader-sentiment")
        third = await start_node(nursery, tmp_path / "c", "--bootstrap", first.address, "--model", "embedded:vader-sentiment")
        client = tmp_path / "client"
        text = "I love this wonderful network. It makes sharing models easy. Everyone is happy with it."
        asked = await run(["ask", "--plan", str(plan_file), text, "--bootstrap", third.address, "--json"], client)
        assert asked.returncode == 0, asked.stderr.decode()
        document = json.loads(asked.stdout)
        assert document["output"]["label"] == "positive"
        assert [s["path"] for s in document["steps"]][0] == "plan.pipeline[0]"
        assert len({s["provider"] for s in document["steps"][1:]}) == 3
        assert document["decisions"][0]["detail"] == "3 of 3 members agree"
        trace = P.Trace.decode(base64.b64decode(document["trace"]))
        assert trace.plan == P.from_dict(document["plan"])
        P.verify_trace(trace, asker=PeerID.from_base58(document["asker"]), now=time.time())

        human = await run(["ask", "--plan", str(plan_file), text, "--bootstrap", first.address], client)
        assert human.returncode == 0, human.stderr.decode()
        assert human.stdout.decode().startswith("positive")
        assert "plan.pipeline[1].ensemble.members[2]" in human.stderr.decode()
        nursery.cancel_scope.cancel()


async def test_a_bad_plan_file_is_a_usage_error_naming_the_path(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("pipeline:\n  - step: summarize\n  - ensemble: {step: sentiment, k: 3, aggregate: mean}\n")
    result = await run(["ask", "--plan", str(bad), "some text", "--bootstrap", "/ip4/127.0.0.1/tcp/1"], tmp_path)
    assert result.returncode == 2
    err = result.stderr.decode()
    assert err.count("\n") == 1 and "bad.yaml: plan.pipeline[1].ensemble.aggregate: unknown aggregator 'mean'" in err
    missing = await run(["ask", "--plan", str(tmp_path / "nope.yaml"), "text"], tmp_path)
    assert missing.returncode == 2 and "cannot read plan file" in missing.stderr.decode()
    both = await run(["ask", "--plan", str(bad), "sentiment", "text"], tmp_path)
    assert both.returncode == 2 and "only the text" in both.stderr.decode()
