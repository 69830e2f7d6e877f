"""The kad stream pool's bookkeeping, and the peer entries of answers, without a network."""

import hypothesis
import hypothesis.strategies as st
import trio
import trio.testing

from modelnet.identity import PrivateKey
from modelnet.p2p.kad import Config
from modelnet.p2p.kad.peer_entries import MAX_ADDR_LENGTH, MAX_THIRD_PARTY_ADDRS, few_addrs, peer_entry_size, peers_from
from modelnet.p2p.kad.pool import StreamPool
from modelnet.protocols.kad import ConnectionType, KadMessage, KadPeer, MessageType, encode_message

PEERS = [PrivateKey.from_seed(bytes([i]) * 32).peer_id for i in range(1, 8)]
IDLE = 60.0


class FakeStream:
    """The pool never reads or writes a stream: identity is all it needs."""

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"FakeStream({self.name})"


async def keep(pool, peer, stream, now):
    """One request's end: the stream goes back to the pool; returns what the pool dropped."""
    async with pool.slot(peer) as slot:
        taken, stale = pool.take(peer, slot, now)
        assert taken is None and stale is None
        return pool.put(peer, slot, stream, now)


async def test_a_kept_stream_is_taken_again_until_it_idled_too_long():
    pool = StreamPool(max_streams=4, idle_timeout=IDLE)
    stream = FakeStream("a")
    assert await keep(pool, PEERS[0], stream, now=0.0) == []
    assert len(pool) == 1
    async with pool.slot(PEERS[0]) as slot:
        assert pool.take(PEERS[0], slot, now=IDLE - 1) == (stream, None)
        assert len(pool) == 0  # in use: not idle
        assert pool.put(PEERS[0], slot, stream, now=IDLE - 1) == []
    async with pool.slot(PEERS[0]) as slot:
        assert pool.take(PEERS[0], slot, now=2 * IDLE - 1) == (None, stream)  # for the caller to close
    assert len(pool) == 0


async def test_the_least_recently_used_streams_go_first_at_the_cap():
    pool = StreamPool(max_streams=2, idle_timeout=IDLE)
    streams = [FakeStream(i) for i in range(3)]
    assert await keep(pool, PEERS[0], streams[0], now=1.0) == []
    assert await keep(pool, PEERS[1], streams[1], now=2.0) == []
    assert await keep(pool, PEERS[2], streams[2], now=3.0) == [streams[0]]
    assert len(pool) == 2
    assert sorted(s.name for s in pool.drain()) == [1, 2]
    assert len(pool) == 0 and pool.drain() == []


async def test_expired_drops_only_the_streams_idle_for_the_timeout():
    pool = StreamPool(max_streams=8, idle_timeout=IDLE)
    old, young = FakeStream("old"), FakeStream("young")
    await keep(pool, PEERS[0], old, now=0.0)
    await keep(pool, PEERS[1], young, now=30.0)
    assert pool.expired(now=IDLE - 1) == []
    assert pool.expired(now=IDLE) == [old]
    assert len(pool) == 1
    assert pool.expired(now=30.0 + IDLE) == [young]
    assert len(pool) == 0


async def test_requests_to_one_peer_wait_for_each_other_and_others_do_not(autojump_clock):
    pool = StreamPool(max_streams=8, idle_timeout=IDLE)
    order = []

    async def request(peer, name, hold):
        async with pool.slot(peer):
            order.append(f"{name} in")
            await trio.sleep(hold)
            order.append(f"{name} out")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(request, PEERS[0], "first", 1.0)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(request, PEERS[0], "second", 0.0)
        nursery.start_soon(request, PEERS[1], "other", 0.0)
    assert order.index("first out") < order.index("second in")
    assert order.index("other out") < order.index("first out")


def test_provider_keys_are_those_under_the_configured_prefixes():
    config = Config(provider_prefixes=(b"/a/", b"/b/"))
    assert config.is_provider_key(b"/a/x") and config.is_provider_key(b"/b/")
    assert not config.is_provider_key(b"/c/x") and not config.is_provider_key(b"/a")


def test_peers_from_an_answer_leave_us_and_bad_entries_out():
    entries = [
        KadPeer.from_peer(PEERS[0], ["/ip4/10.0.0.1/tcp/4001"]),
        KadPeer(b"\x00not a peer id"),
        KadPeer.from_peer(PEERS[1], []),
        KadPeer.from_peer(PEERS[2], ["/ip4/10.0.0.3/tcp/4001"]),
    ]
    assert peers_from(entries, local_peer=PEERS[1]) == [
        (PEERS[0], ["/ip4/10.0.0.1/tcp/4001"]),
        (PEERS[2], ["/ip4/10.0.0.3/tcp/4001"]),
    ]


def test_few_addrs_keeps_a_few_short_ones():
    long = "/dns4/" + "x" * MAX_ADDR_LENGTH + "/tcp/1"
    addrs = [long] + [f"/ip4/10.0.0.{i}/tcp/1" for i in range(2 * MAX_THIRD_PARTY_ADDRS)]
    kept = few_addrs(addrs)
    assert len(kept) == MAX_THIRD_PARTY_ADDRS and long not in kept
    assert kept == tuple(addrs[1 : 1 + MAX_THIRD_PARTY_ADDRS])


@hypothesis.given(
    peer=st.sampled_from(PEERS),
    ports=st.lists(st.integers(1, 65535), max_size=40),
    connection=st.sampled_from(list(ConnectionType)),
)
def test_peer_entry_size_is_exactly_what_the_entry_adds_to_a_message(peer, ports, connection):
    entry = KadPeer.from_peer(peer, [f"/ip4/10.1.2.3/tcp/{port}" for port in ports], connection)
    bare = KadMessage(MessageType.FIND_NODE, key=b"k")
    with_entry = KadMessage(MessageType.FIND_NODE, key=b"k", closer_peers=(entry,))
    assert len(encode_message(with_entry)) - len(encode_message(bare)) == peer_entry_size(entry)
