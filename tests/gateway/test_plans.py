"""Plans as gateway models: the official client asks a plan by name and verifies its trace."""

from __future__ import annotations

import base64
import json

import openai
import pytest
import trio

from modelnet.gateway import Gateway
from modelnet.identity import PeerID
from modelnet.models.embedded import EmbeddedBackend
from modelnet.protocols import plan
from modelnet.protocols import reason
from modelnet.testing import virtual_wall_clock

from . import open_gateway_network

LIMIT = 30  # seconds: bounds a hang, never a measurement
TEXT = "I love this network, it is wonderful. It routes requests between models. The weather is mild."

BRIEF = plan.from_dict({"pipeline": [{"step": {"capability": "summarize", "params": {"sentences": 1}}}, {"step": "sentiment"}]})
VOTE = plan.from_dict({"ensemble": {"step": "sentiment", "k": 2, "aggregate": {"vote": {"field": "label"}}}})
NOBODY = plan.from_dict({"pipeline": [{"step": "sentiment"}, {"step": "translate"}]})


def embedded(*names: str) -> EmbeddedBackend:
    return EmbeddedBackend(offload=False, models=list(names))


def verified(extension: dict, asker: PeerID) -> plan.Trace:
    """What a client does with an answer's ``modelnet`` object: decode and check the trace."""
    assert extension["asker"] == str(asker)
    trace = plan.Trace.decode(base64.b64decode(extension["trace"]))
    plan.verify_trace(trace, asker=PeerID.from_base58(extension["asker"]), now=virtual_wall_clock())
    return trace


async def test_a_plan_is_a_model_and_its_answer_carries_a_verifiable_trace():
    with trio.fail_after(LIMIT):
        async with open_gateway_network(
            [[embedded("textrank-summary", "vader-sentiment")], [embedded("vader-sentiment")]],
            plans={"brief": BRIEF, "vote": VOTE, "nobody": NOBODY},
        ) as net:
            listed = {m.id: m for m in (await net.client.models.list()).data}
            assert {listed[name].model_extra["modelnet"]["kind"] for name in ("brief", "vote", "nobody")} == {"plan"}
            user = [{"role": "system", "content": "ignored by the plan"}, {"role": "user", "content": TEXT}]

            answer = await net.client.chat.completions.create(model="brief", messages=user)
            assert answer.model == "brief" and answer.choices[0].finish_reason == "stop"
            content = json.loads(answer.choices[0].message.content)
            assert content["label"] == "positive"
            extension = answer.model_extra["modelnet"]
            trace = verified(extension, net.node.peer_id)
            assert trace.output == content and trace.input == TEXT
            assert [s["path"] for s in extension["steps"]] == [s.path for s in trace.steps] and len(trace.steps) == 2
            summary, sentiment = trace.steps
            assert (summary.capability, sentiment.capability) == ("summarize", "sentiment")
            assert sentiment.input_sha256 == reason.input_digest(plan.handoff_text(summary.output))  # step 1 fed step 2
            for step, shown in zip(trace.steps, extension["steps"]):
                assert shown["provider"] == str(step.provider) and base64.b64decode(shown["receipt"]) == step.receipt
                reason.open_receipt(step.receipt, provider=step.provider)

            # A tampered trace does not verify: the extension is evidence, not decoration.
            forged = plan.Trace(trace.plan, trace.input, trace.asker, trace.steps, output={"label": "negative"})
            with pytest.raises(plan.InvalidTrace):
                plan.verify_trace(forged, asker=net.node.peer_id, now=virtual_wall_clock())

            # Streamed: the final output in one piece, then the tail with the trace.
            stream = await net.client.chat.completions.create(model="brief", messages=user, stream=True)
            chunks = [chunk async for chunk in stream]
            pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
            assert len(pieces) == 1 and json.loads(pieces[0]) == content
            tail = chunks[-1]
            assert tail.choices[0].finish_reason == "stop" and tail.model == "brief"
            assert verified(tail.model_extra["modelnet"], net.node.peer_id).output == content

            # An ensemble: two distinct providers vote, and the decision is in the answer.
            voted = await net.client.completions.create(model="vote", prompt=TEXT)
            extension = voted.model_extra["modelnet"]
            trace = verified(extension, net.node.peer_id)
            assert json.loads(voted.choices[0].text)["label"] == "positive"
            assert len({step.provider for step in trace.steps}) == 2
            [decision] = extension["decisions"]
            assert decision["aggregate"] == "vote" and decision["ok"]


async def test_a_failed_plan_is_a_502_with_its_trace_and_params_are_refused():
    with trio.fail_after(LIMIT):
        async with open_gateway_network([[embedded("vader-sentiment")]], plans={"nobody": NOBODY, "brief": BRIEF}) as net:
            user = [{"role": "user", "content": TEXT}]
            with pytest.raises(openai.APIStatusError) as failed:
                await net.client.chat.completions.create(model="nobody", messages=user)
            assert failed.value.status_code == 502 and failed.value.code == "plan_failed"
            extension = failed.value.response.json()["modelnet"]
            trace = plan.Trace.decode(base64.b64decode(extension["trace"]))
            assert [step.ok for step in trace.steps] == [True, False] and "translate" in trace.steps[1].error
            with pytest.raises(openai.BadRequestError) as refused:
                await net.client.chat.completions.create(
                    model="brief", messages=user, extra_body={"modelnet": {"params": {"sentences": 2}}}
                )
            assert refused.value.param == "modelnet.params"


def test_an_invalid_plan_tree_is_refused_when_registered():
    bad = plan.Ensemble((plan.Step("sentiment"),) * 3, plan.Vote(), quorum=9)
    with pytest.raises(plan.InvalidPlan):
        Gateway(object(), plans={"bad": bad})  # type: ignore[arg-type]
