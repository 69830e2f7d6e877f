import hypothesis
import hypothesis.strategies as st
import pytest

from modelnet.identity import PrivateKey
from modelnet.p2p.kad.lookup import Lookup
from modelnet.p2p.kad.table import Contact, RoutingTable, distance

PEERS = [PrivateKey.from_seed(i.to_bytes(32, "big")).peer_id for i in range(1001, 1121)]


def contact(peer):
    return Contact(peer, (), 0.0)


def build_network(k):
    """Every peer knows every other through a k-bucket table: a well-formed network."""
    tables = {}
    for peer in PEERS:
        table = RoutingTable(peer, k=k)
        for other in PEERS:
            table.add(other, (), 0.0)
        tables[peer] = table
    return tables


NETWORK = build_network(4)


def true_closest(target, k, among=PEERS):
    return sorted(among, key=lambda p: distance(p.bytes, target))[:k]


def run(lookup, answer, pick=lambda waiting: waiting[0]):
    """Drive ``lookup`` to the end; ``answer(peer)`` gives closer contacts or None (failure).

    Returns the peers in the order they were queried; checks the invariants on the way.
    """
    queried = []
    waiting = []
    for _ in range(10 * len(PEERS)):
        started = lookup.next(0.0)
        queried += [c.peer_id for c in started]
        waiting += [c.peer_id for c in started]
        assert len(waiting) == lookup.in_flight <= lookup.alpha
        if lookup.finished:
            return queried
        assert waiting, "not finished but nothing in flight"
        peer = pick(waiting)
        waiting.remove(peer)
        closer = answer(peer)
        if closer is None:
            lookup.on_failure(peer, 0.0)
        else:
            lookup.on_success(peer, [contact(p) for p in closer], 0.0)
    raise AssertionError("lookup did not terminate")


def network_answer(target, k, dead=frozenset()):
    """Each live peer answers with the k peers its table holds closest to ``target``."""

    def answer(peer):
        if peer in dead:
            return None
        return [c.peer_id for c in NETWORK[peer].closest(target, k)]

    return answer


@pytest.mark.parametrize("target", [b"some key", PEERS[17].bytes, b""])
def test_finds_the_true_k_closest(target):
    lookup = Lookup(target, [contact(PEERS[0]), contact(PEERS[1])], k=4, alpha=3)
    queried = run(lookup, network_answer(target, 4))
    assert lookup.finished
    assert [c.peer_id for c in lookup.closest()] == true_closest(target, 4)
    assert lookup.queries == len(queried) == len(set(queried))
    # farther queries may still be out when the k closest have answered: the driver drops them
    assert lookup.successes + lookup.in_flight == len(queried) and lookup.failures == 0
    assert lookup.hops >= 1


def test_routes_around_dead_peers():
    target = b"another key"
    dead = frozenset(true_closest(target, 2))  # the two closest of all are down
    lookup = Lookup(target, [contact(PEERS[5])], k=4, alpha=2)
    queried = run(lookup, network_answer(target, 4, dead))
    live = [p for p in PEERS if p not in dead]
    assert [c.peer_id for c in lookup.closest()] == true_closest(target, 4, live)
    assert set(dead) <= set(queried)
    assert lookup.failures == 2


def test_no_seeds_is_finished_at_once():
    lookup = Lookup(b"k", [])
    assert lookup.finished
    assert lookup.next(0.0) == []
    assert lookup.closest() == [] and lookup.hops == 0


def test_stop_ends_the_lookup_early():
    lookup = Lookup(b"k", [contact(p) for p in PEERS[:10]], k=5, alpha=3)
    assert len(lookup.next(0.0)) == 3
    lookup.stop()
    assert lookup.finished
    assert lookup.next(0.0) == []


def test_hops_follow_the_chain_of_answers():
    chain = PEERS[:6]  # each peer only knows the next one
    nxt = {a: b for a, b in zip(chain, chain[1:])}
    lookup = Lookup(b"x", [contact(chain[0])], k=20, alpha=3)
    run(lookup, lambda p: [nxt[p]] if p in nxt else [])
    assert lookup.hops == len(chain)
    assert lookup.depth(chain[3]) == 3 and lookup.depth(PEERS[50]) is None


def test_late_unknown_and_repeated_answers_change_nothing():
    a, b = PEERS[:2]
    lookup = Lookup(b"x", [contact(a)], k=3, alpha=1)
    lookup.on_success(a, [contact(b)], 0.0)  # not asked yet
    assert lookup.successes == 0
    assert [c.peer_id for c in lookup.next(0.0)] == [a]
    lookup.on_success(PEERS[9], [contact(b)], 0.0)  # never a candidate
    lookup.on_success(a, [], 0.0)
    lookup.on_success(a, [contact(b)], 0.0)  # a second answer from a
    lookup.on_failure(a, 0.0)
    assert lookup.successes == 1 and lookup.failures == 0
    assert lookup.finished and [c.peer_id for c in lookup.closest()] == [a]


def test_keeps_only_the_k_closest_of_a_long_answer():
    seed = PEERS[0]
    lookup = Lookup(b"x", [contact(seed)], k=3, alpha=3)
    lookup.next(0.0)
    lookup.on_success(seed, [contact(p) for p in PEERS[1:]], 0.0)
    started = lookup.next(0.0)
    assert {c.peer_id for c in started} == set(true_closest(b"x", 3, PEERS[1:]))


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(
    data=st.data(),
    k=st.integers(1, 6),
    alpha=st.integers(1, 4),
    seeds=st.lists(st.integers(0, len(PEERS) - 1), min_size=1, max_size=8, unique=True),
    dead=st.sets(st.integers(0, len(PEERS) - 1), max_size=40),
    target=st.binary(max_size=8),
)
def test_always_terminates_and_never_asks_twice(data, k, alpha, seeds, dead, target):
    dead_peers = {PEERS[i] for i in dead}

    def answer(peer):
        if peer in dead_peers:
            return None
        # an arbitrary subset of what the peer knows, to model partial and odd answers
        known = [c.peer_id for c in NETWORK[peer].closest(target, 8)]
        return data.draw(st.lists(st.sampled_from(known), max_size=8)) if known else []

    lookup = Lookup(target, [contact(PEERS[i]) for i in seeds], k=k, alpha=alpha)
    queried = run(lookup, answer, pick=lambda waiting: data.draw(st.sampled_from(waiting)))
    assert len(queried) == len(set(queried))
    assert lookup.finished
    result = [c.peer_id for c in lookup.closest()]
    assert len(result) <= k
    assert not set(result) & dead_peers
    assert result == sorted(result, key=lambda p: distance(p.bytes, target))


def test_one_answer_adds_at_most_max_new_candidates_of_the_closest_it_names():
    target = b"some key"
    responder, named = PEERS[0], PEERS[1:101]
    lookup = Lookup(target, [contact(responder)], k=20, alpha=3, max_new=5)
    assert [c.peer_id for c in lookup.next(0.0)] == [responder]
    # repeats of one peer count once; farther peers than the k closest named never enter
    lookup.on_success(responder, [contact(p) for p in named + named[:10]], 0.0)
    known = [p for p in named if lookup.depth(p) is not None]
    assert sorted(known, key=lambda p: distance(p.bytes, target)) == true_closest(target, 5, named)
    with pytest.raises(ValueError):
        Lookup(target, [], max_new=0)
