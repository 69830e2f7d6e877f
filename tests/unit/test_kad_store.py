import hypothesis
import hypothesis.strategies as st
import pytest

from modelnet.errors import ModelNetError
from modelnet.identity import PrivateKey
from modelnet.p2p.kad import RecordRejected
from modelnet.p2p.kad.store import (
    MAX_KEY_SIZE,
    MAX_PROVIDER_ADDR_BYTES,
    MAX_PROVIDER_ADDRS,
    _PROVIDER_OVERHEAD,
    ProviderStore,
    RecordStore,
    StoredRecord,
    find_validator,
)

PEERS = [PrivateKey.from_seed(bytes([i]) * 32).peer_id for i in range(1, 8)]


class BadValue(ModelNetError):
    pass


class Versioned:
    """Values are b"v<number>"; the highest number wins."""

    def validate(self, key, value, now):
        if not value.startswith(b"v") or not value[1:].isdigit():
            raise BadValue(f"not a version: {value!r}")

    def select(self, key, values):
        return max(range(len(values)), key=lambda i: int(values[i][1:]))


class Anything:
    def validate(self, key, value, now):
        pass

    def select(self, key, values):
        return 0


def store(**caps):
    return RecordStore({b"/v/": Versioned()}, ttl=100.0, **caps)


def test_put_get_and_expiry():
    records = store()
    assert records.put(b"/v/a", b"v1", 10.0)
    assert records.get(b"/v/a", 50.0) == StoredRecord(b"/v/a", b"v1", 10.0, 110.0)
    assert records.get(b"/v/a", 110.0) is None
    assert len(records) == 0


def test_keys_without_a_validator_and_invalid_values_are_refused():
    records = store()
    with pytest.raises(RecordRejected):
        records.put(b"/other/a", b"v1", 0.0)
    with pytest.raises(BadValue):
        records.put(b"/v/a", b"garbage", 0.0)
    with pytest.raises(RecordRejected):
        store(max_value_size=3).put(b"/v/a", b"v1000", 0.0)
    assert len(records) == 0


def test_the_validator_selects_the_best_value():
    records = store()
    records.put(b"/v/a", b"v2", 0.0)
    assert not records.put(b"/v/a", b"v1", 1.0)
    assert records.get(b"/v/a", 1.0).value == b"v2"
    assert records.put(b"/v/a", b"v3", 2.0)
    assert records.get(b"/v/a", 2.0).value == b"v3"


def test_the_same_value_again_renews_the_expiry():
    records = store()
    records.put(b"/v/a", b"v1", 0.0)
    assert records.put(b"/v/a", b"v1", 60.0)
    assert records.get(b"/v/a", 150.0).expires == 160.0


def test_an_expired_value_does_not_block_an_older_one():
    records = store()
    records.put(b"/v/a", b"v9", 0.0)
    assert records.put(b"/v/a", b"v1", 200.0)


def test_longest_prefix_picks_the_validator():
    strict, loose = Versioned(), Anything()
    validators = {b"/v/": strict, b"/v/free/": loose}
    assert find_validator(validators, b"/v/free/x") is loose
    assert find_validator(validators, b"/v/x") is strict
    assert find_validator(validators, b"/w/x") is None
    records = RecordStore(validators, ttl=10.0)
    assert records.put(b"/v/free/x", b"anything", 0.0)


def test_expire_drops_only_expired_records():
    records = store()
    records.put(b"/v/a", b"v1", 0.0)
    records.put(b"/v/b", b"v1", 50.0)
    assert records.expire(120.0) == 1
    assert b"/v/a" not in records and b"/v/b" in records


def test_count_cap_drops_the_record_that_expires_first():
    records = store(max_records=2)
    records.put(b"/v/a", b"v1", 0.0)
    records.put(b"/v/b", b"v1", 1.0)
    records.put(b"/v/a", b"v1", 2.0)  # renewed: b is now the oldest
    records.put(b"/v/c", b"v1", 3.0)
    assert b"/v/b" not in records and b"/v/a" in records and b"/v/c" in records


def test_byte_cap_bounds_the_total_size_keys_included():
    records = store(max_bytes=18)  # two records of 4 key + 5 value bytes
    records.put(b"/v/a", b"v1234", 0.0)
    records.put(b"/v/b", b"v1234", 1.0)
    records.put(b"/v/c", b"v1234", 2.0)
    assert len(records) == 2 and b"/v/a" not in records
    records.put(b"/v/dd", b"v1234", 3.0)  # one key byte more: b goes as well
    assert len(records) == 1 and b"/v/dd" in records


def test_oversized_keys_are_refused():
    records = RecordStore({b"/v/": Anything()}, ttl=10.0)
    assert records.put(b"/v/" + bytes(MAX_KEY_SIZE - 3), b"x", 0.0)
    with pytest.raises(RecordRejected):
        records.put(b"/v/" + bytes(MAX_KEY_SIZE - 2), b"x", 0.0)
    providers = ProviderStore(ttl=10.0)
    assert not providers.add(bytes(MAX_KEY_SIZE + 1), PEERS[0], [], 0.0)
    assert len(providers) == 0


@hypothesis.settings(max_examples=50, deadline=None)
@hypothesis.given(
    st.lists(
        st.tuples(st.sampled_from([b"/v/a", b"/v/b", b"/v/c", b"/x/d"]), st.binary(max_size=6), st.integers(0, 300)),
        max_size=40,
    )
)
def test_any_puts_keep_the_caps_and_only_valid_values(ops):
    records = store(max_records=2, max_bytes=8, max_value_size=5)
    for key, value, now in sorted(ops, key=lambda op: op[2]):
        try:
            records.put(key, value, float(now))
        except ModelNetError:
            continue
    assert len(records) <= 2
    held = [records.get(k, 0.0) for k in (b"/v/a", b"/v/b", b"/v/c", b"/x/d")]
    held = [r for r in held if r is not None]
    assert sum(len(r.value) for r in held) <= 8
    for record in held:
        Versioned().validate(record.key, record.value, 0.0)


def test_providers_add_list_and_expire():
    providers = ProviderStore(ttl=100.0)
    providers.add(b"k", PEERS[0], ["/memory/1"], 0.0)
    providers.add(b"k", PEERS[1], ["/memory/2"], 50.0)
    assert providers.providers(b"k", 60.0) == [(PEERS[1], ("/memory/2",)), (PEERS[0], ("/memory/1",))]
    assert providers.providers(b"k", 60.0, count=1) == [(PEERS[1], ("/memory/2",))]
    assert providers.providers(b"k", 120.0) == [(PEERS[1], ("/memory/2",))]
    assert providers.expire(120.0) == 1
    assert providers.expire(200.0) == 1
    assert len(providers) == 0 and providers.providers(b"k", 0.0) == []


def test_providers_renew_and_remove():
    providers = ProviderStore(ttl=100.0)
    providers.add(b"k", PEERS[0], ["/memory/1"], 0.0)
    providers.add(b"k", PEERS[0], ["/memory/9"], 90.0)
    assert providers.providers(b"k", 150.0) == [(PEERS[0], ("/memory/9",))]
    providers.remove(b"k", PEERS[0])
    providers.remove(b"k", PEERS[0])
    assert len(providers) == 0


def test_provider_caps_drop_the_oldest():
    providers = ProviderStore(ttl=100.0, max_keys=2, max_per_key=2)
    for i, peer in enumerate(PEERS[:3]):
        providers.add(b"k", peer, [], float(i))
    assert {p for p, _ in providers.providers(b"k", 5.0)} == {PEERS[1], PEERS[2]}
    providers.add(b"j", PEERS[0], [], 5.0)
    providers.add(b"k", PEERS[3], [], 6.0)  # k announced again: j is now the oldest key
    providers.add(b"i", PEERS[0], [], 7.0)
    assert providers.providers(b"j", 8.0) == []
    assert len(providers) == 2 and providers.providers(b"i", 8.0) == [(PEERS[0], ())]


def test_a_provider_past_its_quota_is_refused_and_evicts_no_one():
    providers = ProviderStore(ttl=100.0, max_keys=10, max_keys_per_provider=3)
    assert providers.add(b"honest", PEERS[1], ["/memory/1"], 0.0)
    for i in range(3):
        assert providers.add(b"k%d" % i, PEERS[0], [], 1.0)
    assert not providers.add(b"k3", PEERS[0], [], 2.0)  # a fourth key: refused
    assert not providers.add(b"honest", PEERS[0], [], 2.0)  # also beside someone else
    assert providers.add(b"k1", PEERS[0], ["/memory/9"], 3.0)  # renewing a held key is fine
    assert providers.keys_of(PEERS[0]) == 3 and len(providers) == 4
    assert providers.providers(b"honest", 3.0) == [(PEERS[1], ("/memory/1",))]
    assert providers.providers(b"k1", 3.0) == [(PEERS[0], ("/memory/9",))]
    providers.remove(b"k0", PEERS[0])  # quota freed by remove ...
    assert providers.add(b"k3", PEERS[0], [], 4.0)
    assert providers.expire(101.5) == 2  # ... and by expiry (honest at 0, k2 at 1)
    assert providers.keys_of(PEERS[0]) == 2 and providers.keys_of(PEERS[1]) == 0
    assert providers.add(b"k4", PEERS[0], [], 102.0)


def test_quota_counts_keys_lost_to_the_per_key_cap():
    providers = ProviderStore(ttl=100.0, max_per_key=1, max_keys_per_provider=1)
    providers.add(b"k", PEERS[0], [], 0.0)
    providers.add(b"k", PEERS[1], [], 1.0)  # pushes PEERS[0] out of k
    assert providers.keys_of(PEERS[0]) == 0
    assert providers.add(b"j", PEERS[0], [], 2.0)


def test_provider_addresses_are_capped_per_record():
    providers = ProviderStore(ttl=100.0)
    many = [f"/memory/{i}" for i in range(MAX_PROVIDER_ADDRS + 10)]
    providers.add(b"k", PEERS[0], many, 0.0)
    assert providers.providers(b"k", 1.0) == [(PEERS[0], tuple(many[:MAX_PROVIDER_ADDRS]))]
    long = "/dns4/" + "a" * (MAX_PROVIDER_ADDR_BYTES // 2) + "/tcp/1"
    providers.add(b"k", PEERS[1], [long, long, "/memory/1"], 0.0)  # the second one would pass the cap
    assert providers.providers(b"k", 1.0, count=1) == [(PEERS[1], (long, "/memory/1"))]


def test_provider_byte_budget_drops_the_oldest_keys():
    addrs = ["/dns4/" + "a" * 250 + "/tcp/1"] * 8  # ~2 KiB a record
    providers = ProviderStore(ttl=100.0, max_bytes=20_000)
    for i in range(30):
        providers.add(b"k%d" % i, PEERS[i % len(PEERS)], addrs, float(i))
    assert providers.bytes <= 20_000
    assert 5 <= len(providers) < 10
    assert providers.providers(b"k29", 30.0) and not providers.providers(b"k0", 30.0)


_op = st.tuples(
    st.sampled_from(["add", "add", "add", "remove", "expire"]),
    st.sampled_from([b"a", b"b", b"c", b"d", b"e"]),
    st.integers(0, 4),
    st.lists(st.sampled_from(["/memory/1", "/dns4/" + "x" * 40 + "/tcp/1"]), max_size=4),
    st.integers(0, 300),
)


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(st.lists(_op, max_size=50))
def test_any_provider_ops_keep_every_cap_and_count(ops):
    providers = ProviderStore(ttl=100.0, max_keys=3, max_per_key=2, max_keys_per_provider=2, max_bytes=700)
    for kind, key, peer, addrs, now in sorted(ops, key=lambda op: op[4]):
        if kind == "add":
            providers.add(key, PEERS[peer], addrs, float(now))
        elif kind == "remove":
            providers.remove(key, PEERS[peer])
        else:
            providers.expire(float(now))
    held = {key: providers.providers(key, -1.0) for key in (b"a", b"b", b"c", b"d", b"e")}
    assert len(providers) == sum(1 for records in held.values() if records) <= 3
    assert all(len(records) <= 2 for records in held.values())
    for peer in PEERS[:5]:
        keys = sum(1 for records in held.values() if peer in dict(records))
        assert providers.keys_of(peer) == keys <= 2
    expected = sum(len(key) + sum(_PROVIDER_OVERHEAD + len("".join(a)) for _, a in records) for key, records in held.items() if records)
    assert providers.bytes == expected <= 700
