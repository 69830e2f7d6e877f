"""Forward statements and forwarded results: the chain from the asker to the provider's receipt."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelnet.identity import IdentityError, PrivateKey
from modelnet.protocols import forward, reason
from modelnet.protocols.errors import RemoteProtocolError
from modelnet.protocols.reason import ReasonClient, ReasonServer, Result

from .test_reason_protocol import NOW, PROVIDER, RID, USAGE, request, result_for

ASKER = PrivateKey.from_seed(b"\x41" * 32)
F1 = PrivateKey.from_seed(b"\x42" * 32)
F2 = PrivateKey.from_seed(b"\x43" * 32)


def forwarded(req, *, hops=(F1, F2), output="hello world"):
    """The result as the asker gets it: the provider answered the last hop, each hop vouched."""
    base = result_for(req, output, client=hops[-1].peer_id)
    via: list[bytes] = []
    clients = [ASKER.peer_id] + [h.peer_id for h in hops[:-1]]
    nexts = [h.peer_id for h in hops[1:]] + [PROVIDER.peer_id]
    for hop, client, nxt in reversed(list(zip(hops, clients, nexts))):
        via.insert(0, forward.make_statement(hop, request_id=req.request_id, client=client, next=nxt, receipt=base.receipt, now=NOW))
    return Result(base.output, base.model, base.usage, base.receipt, queue=3, capacity=8, via=tuple(via))


def deliver(result, req=None, first_hop=F1):
    req = req or request()
    client, server = ReasonClient(provider=first_hop.peer_id, client=ASKER.peer_id), ReasonServer()
    server.receive_data(client.send_request(req))
    server.next_event()
    client.receive_data(server.send(result))
    return client, client.next_event()


def test_a_forwarded_result_verifies_and_names_route_and_provider():
    req = request()
    client, result = deliver(forwarded(req), req)
    assert result.load == 3 / 8 and len(result.via) == 2
    assert client.route == (F1.peer_id, F2.peer_id)
    assert client.answered_by == PROVIDER.peer_id


def test_check_route_returns_forwarders_and_provider():
    req = request()
    result = forwarded(req)
    route, provider = forward.check_route(result.via, request_id=RID, asker=ASKER.peer_id, first_hop=F1.peer_id, receipt=result.receipt)
    assert route == (F1.peer_id, F2.peer_id) and provider == PROVIDER.peer_id


@pytest.mark.parametrize(
    "tamper",
    [
        lambda r: Result(r.output, r.model, r.usage, r.receipt, via=r.via[1:]),  # a hop dropped
        lambda r: Result(r.output, r.model, r.usage, r.receipt, via=r.via[::-1]),  # reordered
        lambda r: Result(r.output, r.model, r.usage, result_for(request(input="other"), client=F2.peer_id).receipt, via=r.via),
        lambda r: Result("something else", r.model, r.usage, r.receipt, via=r.via),
    ],
)
def test_a_broken_chain_is_a_remote_error(tamper):
    req = request()
    client, server = ReasonClient(provider=F1.peer_id, client=ASKER.peer_id), ReasonServer()
    server.receive_data(client.send_request(req))
    server.next_event()
    client.receive_data(server.send(tamper(forwarded(req))))
    with pytest.raises(RemoteProtocolError):
        client.next_event()


def test_a_chain_for_another_asker_or_first_hop_is_refused():
    req = request()
    result = forwarded(req)
    with pytest.raises(RemoteProtocolError):
        forward.check_route(result.via, request_id=RID, asker=F2.peer_id, first_hop=F1.peer_id, receipt=result.receipt)
    with pytest.raises(IdentityError):  # the first statement is not F2's
        forward.check_route(result.via, request_id=RID, asker=ASKER.peer_id, first_hop=F2.peer_id, receipt=result.receipt)
    with pytest.raises(RemoteProtocolError):
        forward.check_route(result.via, request_id=bytes(16), asker=ASKER.peer_id, first_hop=F1.peer_id, receipt=result.receipt)
    with pytest.raises(RemoteProtocolError):
        forward.check_route((), request_id=RID, asker=ASKER.peer_id, first_hop=F1.peer_id, receipt=result.receipt)


def test_a_route_that_loops_is_refused():
    req = request()
    base = result_for(req, client=F1.peer_id)
    looping = forward.make_statement(F1, request_id=RID, client=ASKER.peer_id, next=ASKER.peer_id, receipt=base.receipt, now=NOW)
    with pytest.raises(RemoteProtocolError, match="loops"):
        forward.check_route((looping,), request_id=RID, asker=ASKER.peer_id, first_hop=F1.peer_id, receipt=base.receipt)


def test_result_fields_are_checked():
    from modelnet.protocols.errors import LocalProtocolError

    for bad in ({"queue": -1}, {"capacity": True}, {"via": [b""]}, {"via": (b"x",) * 33}, {"via": ("text",)}):
        with pytest.raises(LocalProtocolError):
            Result("x", "m", USAGE, b"r", **bad)


@settings(max_examples=200)
@given(st.binary(max_size=400))
def test_any_bytes_into_open_statement(data):
    try:
        statement = forward.open_statement(data)
    except (IdentityError, RemoteProtocolError):
        return
    assert isinstance(statement, forward.Statement)


@settings(max_examples=100)
@given(st.lists(st.binary(max_size=200), min_size=1, max_size=4))
def test_any_statements_into_check_route(statements):
    with pytest.raises((IdentityError, RemoteProtocolError)):
        forward.check_route(statements, request_id=RID, asker=ASKER.peer_id, first_hop=F1.peer_id, receipt=b"r")


@settings(max_examples=30)
@given(st.lists(st.sampled_from([F1, F2, PrivateKey.from_seed(b"\x44" * 32)]), min_size=1, max_size=3, unique=True))
def test_statement_chains_round_trip(hops):
    req = request()
    result = forwarded(req, hops=tuple(hops))
    route, provider = forward.check_route(
        result.via, request_id=RID, asker=ASKER.peer_id, first_hop=hops[0].peer_id, receipt=result.receipt
    )
    assert route == tuple(h.peer_id for h in hops) and provider == PROVIDER.peer_id
    reason.open_receipt(result.receipt, provider=provider)
