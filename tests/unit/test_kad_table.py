import random

import hypothesis
import hypothesis.strategies as st
import pytest

from modelnet.identity import PrivateKey
from modelnet.p2p.kad.table import (
    KEY_BITS,
    MAX_REFRESH_CPL,
    Contact,
    RoutingTable,
    common_prefix_length,
    distance,
    kad_key,
)

PEERS = [PrivateKey.from_seed(i.to_bytes(32, "big")).peer_id for i in range(1, 161)]
LOCAL, OTHERS = PEERS[0], PEERS[1:]


def bucket_of(peer):
    return common_prefix_length(kad_key(LOCAL.bytes), kad_key(peer.bytes))


def same_bucket(n, index=0):
    """``n`` peers that all fall into bucket ``index`` of LOCAL's table."""
    peers = [p for p in OTHERS if bucket_of(p) == index][:n]
    assert len(peers) == n
    return peers


def test_distance_is_xor_of_sha256():
    import hashlib

    a, b = b"alpha", b"beta"
    expected = int.from_bytes(hashlib.sha256(a).digest(), "big") ^ int.from_bytes(hashlib.sha256(b).digest(), "big")
    assert distance(a, b) == expected
    assert distance(a, a) == 0
    assert common_prefix_length(5, 5) == KEY_BITS


def test_contact_caches_its_key_and_is_frozen():
    contact = Contact(OTHERS[0], ["/memory/1"], 1.0)
    assert contact.addrs == ("/memory/1",)
    assert contact.key == kad_key(OTHERS[0].bytes)
    with pytest.raises(AttributeError):
        contact.last_seen = 2.0  # type: ignore[misc]


def test_add_contact_remove_and_len():
    table = RoutingTable(LOCAL)
    assert table.add(OTHERS[0], ["/memory/1"], 1.0)
    assert table.add(OTHERS[1], ["/memory/2"], 2.0)
    assert len(table) == 2 and OTHERS[0] in table
    assert table.contact(OTHERS[0]) == Contact(OTHERS[0], ("/memory/1",), 1.0)
    table.remove(OTHERS[0])
    assert OTHERS[0] not in table and len(table) == 1
    assert table.contact(OTHERS[0]) is None


def test_never_adds_itself():
    table = RoutingTable(LOCAL)
    assert not table.add(LOCAL, ["/memory/0"], 1.0)
    assert len(table) == 0


def test_readding_keeps_known_addrs_and_refreshes_last_seen():
    table = RoutingTable(LOCAL)
    table.add(OTHERS[0], ["/memory/1"], 1.0)
    table.add(OTHERS[0], [], 5.0)
    assert table.contact(OTHERS[0]) == Contact(OTHERS[0], ("/memory/1",), 5.0)


def test_full_bucket_keeps_old_peers_and_offers_the_oldest_to_ping():
    a, b, c, d = same_bucket(4)
    table = RoutingTable(LOCAL, k=2)
    assert table.add(a, ["/memory/a"], 1.0)
    assert table.add(b, ["/memory/b"], 2.0)
    assert table.ping_candidate(a) is None  # a is in the table, not waiting
    assert not table.add(c, ["/memory/c"], 3.0)
    assert c not in table and a in table and b in table
    assert table.ping_candidate(c).peer_id == a
    # a answers again: it becomes the most recently seen, b is now the oldest
    assert table.add(a, [], 4.0)
    assert table.ping_candidate(c).peer_id == b
    assert table.ping_candidate(d) is None  # d never asked for a place


def test_failures_evict_after_max_and_promote_the_freshest_replacement():
    a, b, c, d = same_bucket(4)
    table = RoutingTable(LOCAL, k=2, max_failures=2)
    table.add(a, [], 1.0)
    table.add(b, [], 2.0)
    table.add(c, [], 3.0)
    table.add(d, [], 4.0)
    assert not table.mark_failed(a, 5.0)
    assert a in table
    assert table.mark_failed(a, 6.0)
    assert a not in table and d in table and c not in table
    # c is still a candidate for the next place
    table.remove(b)
    assert c in table


def test_a_success_between_failures_resets_the_count():
    a = OTHERS[0]
    table = RoutingTable(LOCAL, max_failures=2)
    table.add(a, [], 1.0)
    table.mark_failed(a, 2.0)
    table.add(a, [], 3.0)
    assert not table.mark_failed(a, 4.0)
    assert a in table


def test_a_failing_replacement_is_forgotten():
    a, b, c = same_bucket(3)
    table = RoutingTable(LOCAL, k=2, max_failures=1)
    table.add(a, [], 1.0)
    table.add(b, [], 2.0)
    table.add(c, [], 3.0)
    assert not table.mark_failed(c, 4.0)
    assert table.mark_failed(a, 5.0)
    assert c not in table and len(table) == 1


def test_mark_failed_on_an_unknown_peer_is_harmless():
    table = RoutingTable(LOCAL)
    assert not table.mark_failed(OTHERS[0], 1.0)
    assert len(table) == 0


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(
    members=st.lists(st.integers(0, len(OTHERS) - 1), unique=True, max_size=60),
    target=st.binary(max_size=40),
    count=st.integers(1, 30),
    excluded=st.lists(st.integers(0, len(OTHERS) - 1), max_size=5),
)
def test_closest_is_the_brute_force_order(members, target, count, excluded):
    table = RoutingTable(LOCAL, k=4)
    for i in members:
        table.add(OTHERS[i], [], float(i))
    present = [c.peer_id for c in table]
    assert len(present) == len(table) <= len(members)
    exclude = {OTHERS[i] for i in excluded}
    expected = sorted((p for p in present if p not in exclude), key=lambda p: distance(p.bytes, target))[:count]
    assert [c.peer_id for c in table.closest(target, count, exclude=exclude)] == expected


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(st.lists(st.tuples(st.sampled_from(["add", "fail", "remove"]), st.integers(0, 40)), max_size=120))
def test_buckets_never_exceed_k(ops):
    k = 3
    table = RoutingTable(LOCAL, k=k)
    for now, (op, i) in enumerate(ops):
        peer = OTHERS[i]
        if op == "add":
            table.add(peer, [], float(now))
        elif op == "fail":
            table.mark_failed(peer, float(now))
        else:
            table.remove(peer)
    by_bucket: dict[int, int] = {}
    for contact in table:
        index = bucket_of(contact.peer_id)
        by_bucket[index] = by_bucket.get(index, 0) + 1
    assert all(n <= k for n in by_bucket.values())
    assert LOCAL not in table
    assert all(table.contact(c.peer_id) == c for c in table)


def test_buckets_to_refresh_covers_stale_buckets_up_to_the_deepest():
    table = RoutingTable(LOCAL)
    for peer in OTHERS[:40]:
        table.add(peer, [], 0.0)
    deepest = max(bucket_of(p) for p in OTHERS[:40])
    targets = table.buckets_to_refresh(100.0, 50.0, random.Random(7))
    assert [bucket_of_key(t) for t in targets] == list(range(min(deepest, MAX_REFRESH_CPL) + 1))
    # a bucket looked up recently is left alone; the same seed gives the same targets
    table.mark_refreshed(targets[0], 90.0)
    again = table.buckets_to_refresh(100.0, 50.0, random.Random(7))
    assert [bucket_of_key(t) for t in again] == list(range(1, min(deepest, MAX_REFRESH_CPL) + 1))
    assert table.buckets_to_refresh(100.0, 50.0, random.Random(7)) == again


def test_empty_table_needs_no_refresh():
    assert RoutingTable(LOCAL).buckets_to_refresh(0.0, 1.0, random.Random(1)) == []


def bucket_of_key(key: bytes) -> int:
    return common_prefix_length(kad_key(LOCAL.bytes), kad_key(key))


def test_a_self_lookup_marks_the_buckets_it_covers_refreshed():
    from modelnet.p2p.kad.table import sort_by_distance

    local = PrivateKey.from_seed(b"\x07" * 32).peer_id
    peers = [PrivateKey.from_seed(i.to_bytes(32, "big")).peer_id for i in range(3000, 3200)]
    table = RoutingTable(local, k=4)
    for peer in peers:
        table.add(peer, (), 0.0)
    stale_before = len(table.buckets_to_refresh(1000.0, 600.0, random.Random(1)))
    # fewer than k answers: the lookup saw everyone, no bucket needs a random lookup
    few = [Contact(p, (), 0.0) for p in peers[:3]]
    table.mark_neighbourhood_refreshed(few, 1000.0)
    assert table.buckets_to_refresh(1000.0, 600.0, random.Random(1)) == []
    # k answers: only the buckets at or above the farthest one's are left
    table = RoutingTable(local, k=4)
    for peer in peers:
        table.add(peer, (), 0.0)
    closest = sort_by_distance(local.bytes, [Contact(p, (), 0.0) for p in peers], 4)
    farthest = common_prefix_length(kad_key(local.bytes), closest[-1].key)
    table.mark_neighbourhood_refreshed(closest, 1000.0)
    targets = table.buckets_to_refresh(1000.0, 600.0, random.Random(1))
    cpls = [common_prefix_length(kad_key(local.bytes), kad_key(t)) for t in targets]
    assert cpls == list(range(farthest + 1)) and len(targets) < stale_before
