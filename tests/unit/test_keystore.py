"""Key files: atomic, private, sealed with a passphrase, with errors a user can act on."""

import base64
import json
import os
import stat
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelnet.identity import KeystoreError, PrivateKey, load_key, load_or_create_key, save_key

KEY = PrivateKey.from_seed(b"\x07" * 32)
OTHER = PrivateKey.from_seed(b"\x08" * 32)
CHEAP = 2**10  # scrypt n for tests


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def rewrite(path: Path, **changes) -> None:
    doc = json.loads(path.read_text())
    doc.update(changes)
    path.write_text(json.dumps(doc))


def test_plain_round_trip(tmp_path):
    path = tmp_path / "node.key"
    save_key(path, KEY)
    assert load_key(path).seed == KEY.seed
    assert mode(path) == 0o600
    doc = json.loads(path.read_text())
    assert doc == {
        "version": 1,
        "type": "ed25519",
        "peer_id": str(KEY.peer_id),
        "seed": base64.b64encode(KEY.seed).decode(),
    }


def test_sealed_round_trip_keeps_the_seed_out_of_the_file(tmp_path):
    path = tmp_path / "node.key"
    save_key(path, KEY, "correct horse", scrypt_n=CHEAP)
    assert load_key(path, "correct horse").seed == KEY.seed
    text = path.read_text()
    assert "seed" not in json.loads(text)
    assert base64.b64encode(KEY.seed).decode() not in text
    doc = json.loads(text)
    assert doc["kdf"]["name"] == "scrypt" and doc["kdf"]["n"] == CHEAP
    assert doc["cipher"]["name"] == "chacha20-poly1305"


def test_wrong_passphrase(tmp_path):
    path = tmp_path / "node.key"
    save_key(path, KEY, "right", scrypt_n=CHEAP)
    with pytest.raises(KeystoreError, match="wrong passphrase"):
        load_key(path, "wrong")


def test_passphrase_needed(tmp_path):
    path = tmp_path / "node.key"
    save_key(path, KEY, "right", scrypt_n=CHEAP)
    with pytest.raises(KeystoreError, match="passphrase is needed"):
        load_key(path)


def test_the_peer_id_is_bound_to_the_ciphertext(tmp_path):
    path = tmp_path / "node.key"
    save_key(path, KEY, "pw", scrypt_n=CHEAP)
    rewrite(path, peer_id=str(OTHER.peer_id))
    with pytest.raises(KeystoreError, match="wrong passphrase"):
        load_key(path, "pw")


def test_altered_ciphertext_is_refused(tmp_path):
    path = tmp_path / "node.key"
    save_key(path, KEY, "pw", scrypt_n=CHEAP)
    doc = json.loads(path.read_text())
    sealed = bytearray(base64.b64decode(doc["cipher"]["ciphertext"]))
    sealed[0] ^= 1
    doc["cipher"]["ciphertext"] = base64.b64encode(bytes(sealed)).decode()
    path.write_text(json.dumps(doc))
    with pytest.raises(KeystoreError, match="altered"):
        load_key(path, "pw")


def test_missing_file(tmp_path):
    with pytest.raises(KeystoreError, match="no key file"):
        load_key(tmp_path / "absent.key")


@pytest.mark.parametrize("open_mode", [0o640, 0o604, 0o644, 0o660])
def test_a_file_others_can_read_is_refused_with_the_fix(tmp_path, open_mode):
    path = tmp_path / "node.key"
    save_key(path, KEY)
    os.chmod(path, open_mode)
    with pytest.raises(KeystoreError, match=f"chmod 600 {path}"):
        load_key(path)


def test_a_directory_is_not_a_key_file(tmp_path):
    (tmp_path / "dir.key").mkdir(mode=0o700)
    with pytest.raises(KeystoreError, match="not a regular file"):
        load_key(tmp_path / "dir.key")


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"version": 2, "type": "ed25519"}', "version 2"),
        ('{"version": true, "type": "ed25519"}', "version"),
        ('{"version": 1, "type": "rsa"}', "only 'ed25519'"),
        ('{"version": 1, "type": "ed25519"}', "no peer id"),
        ('{"version": 1, "type": "ed25519", "peer_id": "x", "seed": "%%%"}', "not base64"),
        ('{"version": 1, "type": "ed25519", "peer_id": "x", "seed": "AAAA"}', "not 32 bytes"),
    ],
)
def test_corrupt_files_say_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "node.key"
    save_key(path, KEY)
    path.write_text(text)
    with pytest.raises(KeystoreError, match=message):
        load_key(path)


def test_non_utf8_file(tmp_path):
    path = tmp_path / "node.key"
    save_key(path, KEY)
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(KeystoreError, match="corrupt"):
        load_key(path)


def test_a_peer_id_that_does_not_match_the_key(tmp_path):
    path = tmp_path / "node.key"
    save_key(path, KEY)
    rewrite(path, peer_id=str(OTHER.peer_id))
    with pytest.raises(KeystoreError, match=f"names peer {OTHER.peer_id}"):
        load_key(path)


@pytest.mark.parametrize(
    "kdf",
    [
        {"n": 2**30},  # a crafted file must not demand gigabytes
        {"n": 2**10 + 1},
        {"r": 0},
        {"p": 17},
        {"n": 2**18, "r": 16},
        {"name": "argon2"},
        {"n": "1024"},
    ],
)
def test_kdf_parameters_out_of_range_are_refused_before_deriving(tmp_path, kdf):
    path = tmp_path / "node.key"
    save_key(path, KEY, "pw", scrypt_n=CHEAP)
    doc = json.loads(path.read_text())
    doc["kdf"].update(kdf)
    path.write_text(json.dumps(doc))
    with pytest.raises(KeystoreError, match="scrypt parameters out of range|unsupported kdf"):
        load_key(path, "pw")


def test_save_refuses_an_unsafe_scrypt_n(tmp_path):
    with pytest.raises(KeystoreError):
        save_key(tmp_path / "k", KEY, "pw", scrypt_n=1000)


def test_the_file_is_created_0600_even_with_an_open_umask(tmp_path, monkeypatch):
    opened = []
    real_open = os.open

    def recording_open(path, flags, file_mode=0o777, *args, **kwargs):
        if flags & os.O_CREAT:
            opened.append((flags, file_mode))
        return real_open(path, flags, file_mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", recording_open)
    old = os.umask(0)
    try:
        save_key(tmp_path / "node.key", KEY)
    finally:
        os.umask(old)
    assert opened and all(flags & os.O_EXCL and file_mode == 0o600 for flags, file_mode in opened)
    assert mode(tmp_path / "node.key") == 0o600


def test_the_file_is_readable_by_its_owner_even_with_a_narrow_umask(tmp_path):
    old = os.umask(0o277)
    try:
        save_key(tmp_path / "node.key", KEY)
    finally:
        os.umask(old)
    assert mode(tmp_path / "node.key") == 0o600
    assert load_key(tmp_path / "node.key").seed == KEY.seed


def test_save_replaces_atomically_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "node.key"
    save_key(path, KEY)
    save_key(path, OTHER)
    assert load_key(path).seed == OTHER.seed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.key"]


def test_save_into_a_missing_directory_is_a_keystore_error(tmp_path):
    with pytest.raises(KeystoreError, match="cannot write"):
        save_key(tmp_path / "absent" / "node.key", KEY)


def test_load_or_create_creates_private_directories_then_loads(tmp_path):
    path = tmp_path / "a" / "b" / "node.key"
    key, created = load_or_create_key(path)
    assert created
    assert mode(tmp_path / "a") == 0o700 and mode(tmp_path / "a" / "b") == 0o700
    assert mode(path) == 0o600
    again, created_again = load_or_create_key(path)
    assert not created_again and again.seed == key.seed


def test_load_or_create_with_a_passphrase(tmp_path):
    path = tmp_path / "node.key"
    key, created = load_or_create_key(path, "pw", scrypt_n=CHEAP)
    assert created
    assert load_or_create_key(path, "pw", scrypt_n=CHEAP)[0].seed == key.seed
    with pytest.raises(KeystoreError, match="passphrase is needed"):
        load_or_create_key(path)


def test_load_or_create_never_clobbers_a_key_created_meanwhile(tmp_path, monkeypatch):
    path = tmp_path / "node.key"
    save_key(path, KEY)
    # as if another process created the file between our check and our write
    monkeypatch.setattr(os.path, "lexists", lambda p: False)
    key, created = load_or_create_key(path)
    assert not created and key.seed == KEY.seed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.key"]


def test_load_or_create_does_not_replace_a_broken_file(tmp_path):
    path = tmp_path / "node.key"
    path.write_text("garbage")
    os.chmod(path, 0o600)
    with pytest.raises(KeystoreError, match="not JSON"):
        load_or_create_key(path)
    assert path.read_text() == "garbage"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    changes=st.dictionaries(
        st.sampled_from(["version", "type", "peer_id", "seed", "kdf", "cipher", "extra"]), json_values, max_size=3
    ),
    sealed=st.booleans(),
)
def test_any_edit_of_a_key_file_loads_the_key_or_raises_keystore_error(changes, sealed):
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "node.key"
        save_key(path, KEY, "pw" if sealed else None, scrypt_n=CHEAP)
        rewrite(path, **changes)
        try:
            key = load_key(path, "pw")
        except KeystoreError:
            return
        assert key.seed == KEY.seed  # nothing but the real key ever loads


@settings(max_examples=100)
@given(st.binary(max_size=200))
def test_any_file_content_loads_or_raises_keystore_error(content):
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "node.key"
        path.write_bytes(content)
        os.chmod(path, 0o600)
        with pytest.raises(KeystoreError):
            load_key(path, "pw")


def test_a_symlinked_key_file_is_refused(tmp_path):
    real = tmp_path / "real.key"
    save_key(real, PrivateKey.from_seed(b"\x07" * 32), scrypt_n=2**10)
    link = tmp_path / "node.key"
    link.symlink_to(real)
    with pytest.raises(KeystoreError):
        load_key(link)
