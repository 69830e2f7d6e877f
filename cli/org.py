"""``modelnet org …``: organisations, membership certificates, revocations.

Home folder layout (next to ``node.key``)::

    orgs/<name>.key              an organisation key (keystore format, --passphrase-env seals it)
    orgs/<name>.revoked          its latest signed revocation list (cumulative; seq grows)
    memberships/<org id>.membership   memberships this node holds (`org join`), mode 600

A membership file holds the organisation's records key: it is as sensitive as a key.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from .main import EXIT_OK, EXIT_USAGE, KEY_FILE, CliError, bootstrap_addrs, home_dir, load_config, passphrase, swarm_key

ORGS_DIR = "orgs"
MEMBERSHIPS_DIR = "memberships"
MEMBERSHIP_SUFFIX = ".membership"
DEFAULT_CERT_LIFETIME = 30 * 86400.0
MAX_CERT_LIFETIME = 365 * 86400.0
# A revocation must outlive every certificate it revokes: longer than the longest one.
REVOCATION_LIFETIME = MAX_CERT_LIFETIME + 35 * 86400.0
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
MAX_MEMBERSHIP_FILE = 8192


def _org_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise CliError(f"organisation name {name!r} must be 1..64 of letters, digits . _ - (not starting with . _ -)", EXIT_USAGE)
    return name


def parse_duration(text: str) -> float:
    """``30d``, ``12h``, ``90m``, ``3600s`` or plain seconds."""
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise CliError(f"--expires takes a duration like 30d, 12h, 90m, not {text!r}", EXIT_USAGE)
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if not 0 < seconds <= MAX_CERT_LIFETIME:
        raise CliError(f"--expires must be more than 0 and at most {MAX_CERT_LIFETIME / 86400:.0f}d", EXIT_USAGE)
    return seconds


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` atomically, mode 600 from creation on."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _read_bounded(path: Path, what: str, limit: int) -> bytes:
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise CliError(f"cannot read {what} {path}: {exc.strerror or exc}", EXIT_USAGE) from None
    if len(data) > limit:
        raise CliError(f"{path} is not a {what}: larger than {limit} bytes", EXIT_USAGE)
    return data


def _org_key_path(home: Path, name: str) -> Path:
    return home / ORGS_DIR / f"{_org_name(name)}.key"


def _load_org_key(args: argparse.Namespace, name: str):
    from modelnet.identity import keystore

    path = _org_key_path(home_dir(args), name)
    if not path.exists():
        raise CliError(f"no organisation {name!r} in {path.parent}: run `modelnet org create {name}` first", EXIT_USAGE)
    return keystore.load_key(path, passphrase(args))


def _peer(text: str, what: str):
    from modelnet.identity import InvalidPeerId, PeerID

    try:
        return PeerID.from_base58(text)
    except InvalidPeerId as exc:
        raise CliError(f"{what}: {exc}", EXIT_USAGE) from None


# -- what the node loads ---------------------------------------------------------------


def installed_memberships(home: Path, *, now: float) -> list:
    """Valid memberships installed in ``home``; expired or unreadable ones are skipped with a note."""
    from modelnet.identity import Membership, OrgError

    folder = home / MEMBERSHIPS_DIR
    found = []
    for path in sorted(folder.glob(f"*{MEMBERSHIP_SUFFIX}")) if folder.is_dir() else ():
        try:
            found.append(Membership.decode(_read_bounded(path, "membership file", MAX_MEMBERSHIP_FILE), now=now))
        except (OrgError, CliError) as exc:
            print(f"modelnet: skipping membership {path.name}: {exc}", file=sys.stderr)
    return found


def owned_revocations(home: Path, *, now: float) -> list:
    """The revocation lists of the organisations whose keys are in ``home``."""
    from modelnet.identity import OrgError, open_revocation

    found = []
    folder = home / ORGS_DIR
    for path in sorted(folder.glob("*.revoked")) if folder.is_dir() else ():
        try:
            found.append(open_revocation(path.read_bytes(), now=now))
        except (OSError, OrgError) as exc:
            print(f"modelnet: skipping revocation list {path.name}: {exc}", file=sys.stderr)
    return found


def parse_policies(items: list[str], served: set[str]) -> dict[str, Any]:
    """``MODEL=POLICY`` options into ``{model: AccessPolicy}``; every MODEL must be ``served``."""
    from modelnet.protocols.access import AccessPolicy
    from modelnet.protocols.errors import LocalProtocolError

    policies: dict[str, Any] = {}
    for item in items:
        model, sep, text = item.partition("=")
        if not sep or not model:
            raise CliError(f"--policy takes MODEL=POLICY (e.g. my-model=org:12D3KooW…), got {item!r}", EXIT_USAGE)
        try:
            policies[model] = AccessPolicy.parse(text)
        except LocalProtocolError as exc:
            raise CliError(f"--policy {model}: {exc}", EXIT_USAGE) from None
        if model not in served:
            raise CliError(f"--policy {model}: this node serves no model {model!r} (it serves {', '.join(sorted(served))})", EXIT_USAGE)
    return policies


# -- commands ---------------------------------------------------------------------------


def cmd_create(args: argparse.Namespace) -> int:
    from modelnet.identity import KeystoreError, keystore

    path = _org_key_path(home_dir(args), args.name)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        key, created = keystore.load_or_create_key(path, passphrase(args))
    except KeystoreError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    if not created:
        raise CliError(f"organisation {args.name!r} already exists: {key.peer_id} ({path})", EXIT_USAGE)
    print(f"organisation {args.name} {key.peer_id}")
    print(f"key {path} (mode 600{', encrypted' if passphrase(args) else ''})")
    return EXIT_OK


def cmd_issue(args: argparse.Namespace) -> int:
    from modelnet.identity import Membership, OrgError, issue_certificate, records_key

    org_key = _load_org_key(args, args.name)
    member = _peer(args.member, "--member")
    now = time.time()
    lifetime = parse_duration(args.expires)
    try:
        certificate = issue_certificate(org_key, args.name, member, roles=args.role or (), now=now, expires=now + lifetime)
    except OrgError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    out = Path(args.out or f"{args.name}-{member.short()}{MEMBERSHIP_SUFFIX}")
    _write_private(out, Membership(certificate, records_key(org_key)).encode())
    roles = ", ".join(certificate.roles) or "none"
    print(f"membership of {args.name} for {member}, roles: {roles}, expires {_when(certificate.expires)}")
    print(f"written to {out} (mode 600: it holds the organisation's records key)")
    print(f"on the member node: modelnet org join {out}")
    return EXIT_OK


def cmd_join(args: argparse.Namespace) -> int:
    from modelnet.identity import Membership, OrgError, keystore

    home = home_dir(args)
    data = _read_bounded(Path(args.file), "membership file", MAX_MEMBERSHIP_FILE)
    try:
        membership = Membership.decode(data, now=time.time())
    except OrgError as exc:
        raise CliError(f"{args.file} is not a valid membership: {exc}", EXIT_USAGE) from None
    key_path = home / KEY_FILE
    if not key_path.exists():
        raise CliError(f"no node key in {home}: run `modelnet init --home {home}` first", EXIT_USAGE)
    node = keystore.load_key(key_path, passphrase(args)).peer_id
    if membership.certificate.member != node:
        raise CliError(f"this membership is for {membership.certificate.member}, not for this node ({node})", EXIT_USAGE)
    path = home / MEMBERSHIPS_DIR / f"{membership.org}{MEMBERSHIP_SUFFIX}"
    _write_private(path, data)
    print(f"joined {membership.org_name} ({membership.org}) until {_when(membership.certificate.expires)}")
    print(f"installed {path}; `modelnet node` presents it and finds the organisation's private models")
    return EXIT_OK


def cmd_revoke(args: argparse.Namespace) -> int:
    from modelnet.identity import OrgError, make_revocation, open_revocation

    home = home_dir(args)
    org_key = _load_org_key(args, args.name)
    member = _peer(args.peer, "peer to revoke")
    swarm = swarm_key(args)  # a bad key file is a usage error before anything is written
    path = home / ORGS_DIR / f"{_org_name(args.name)}.revoked"
    now = time.time()
    revoked, seq = set(), 0
    if path.exists():
        try:
            # Expiry is not checked: an old list still names who was revoked.
            previous = open_revocation(path.read_bytes(), now=0.0, org=org_key.peer_id)
        except OrgError as exc:
            raise CliError(f"{path} is corrupt: {exc}", EXIT_USAGE) from None
        revoked, seq = set(previous.revoked), previous.seq
    revoked.add(member)
    try:
        revocation = make_revocation(org_key, revoked, seq=seq + 1, now=now, expires=now + REVOCATION_LIFETIME)
    except OrgError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    _write_private(path, revocation.encode())
    print(f"revoked {member} in {args.name}: {len(revoked)} revoked, list #{revocation.seq} in {path}")
    bootstrap = bootstrap_addrs(args, load_config(home))
    if not bootstrap:
        print("not published: no bootstrap address (pass --bootstrap, or run `modelnet node` here: it honours it)")
        return EXIT_OK
    import trio

    replicas = trio.run(_publish_revocation, revocation, bootstrap, args.timeout, swarm)
    print(f"published to {replicas} peer(s); providers honour it within one refresh interval")
    return EXIT_OK


async def _publish_revocation(revocation, bootstrap: list[str], timeout: float, swarm=None) -> int:
    import trio

    from modelnet.identity import PrivateKey, revocation_key
    from modelnet.p2p.libp2p_host import open_libp2p_host
    from modelnet.p2p.node import Config, Node

    from .main import DEFAULT_LISTEN, _start

    key = PrivateKey.generate()  # a light client: the revocation is signed by the org, not by us
    async with open_libp2p_host(key, [DEFAULT_LISTEN], swarm_key=swarm) as host:
        node = Node(host, key, (), Config(client_mode=True))
        async with trio.open_nursery() as nursery:
            await _start(nursery, node, bootstrap, timeout)
            try:
                with trio.fail_after(timeout):
                    replicas = await node.dht.put_value(revocation_key(revocation.org), revocation.encode())
            except trio.TooSlowError:
                raise CliError(f"publishing the revocation took longer than {timeout:g} s") from None
            nursery.cancel_scope.cancel()
    return replicas


def cmd_show(args: argparse.Namespace) -> int:
    from modelnet.identity import Membership, OrgError, open_revocation

    home = home_dir(args)
    now = time.time()
    owned, held = [], []
    for path in sorted((home / ORGS_DIR).glob("*.key")) if (home / ORGS_DIR).is_dir() else ():
        entry: dict[str, Any] = {"name": path.stem, "key": str(path)}
        try:
            entry["id"] = json.loads(path.read_text()).get("peer_id")  # the public half, no passphrase needed
        except (OSError, ValueError) as exc:
            entry["error"] = str(exc)
        revoked_path = path.with_suffix(".revoked")
        if revoked_path.exists():
            try:
                revocation = open_revocation(revoked_path.read_bytes(), now=0.0)
                entry["revoked"] = sorted(str(p) for p in revocation.revoked)
                entry["revocation_seq"] = revocation.seq
            except (OSError, OrgError) as exc:
                entry["error"] = str(exc)
        owned.append(entry)
    folder = home / MEMBERSHIPS_DIR
    for path in sorted(folder.glob(f"*{MEMBERSHIP_SUFFIX}")) if folder.is_dir() else ():
        try:
            membership = Membership.decode(_read_bounded(path, "membership file", MAX_MEMBERSHIP_FILE), now=now)
        except (OrgError, CliError) as exc:  # an expired one says so, with its organisation and date
            held.append({"file": str(path), "status": str(exc)})
            continue
        cert = membership.certificate
        held.append(
            {
                "org": cert.org_name,
                "id": str(cert.org),
                "member": str(cert.member),
                "roles": list(cert.roles),
                "expires": cert.expires,
                "status": "valid",
            }
        )
    if args.json:
        print(json.dumps({"organisations": owned, "memberships": held}, indent=2))
        return EXIT_OK
    print(f"organisations owned ({len(owned)}):")
    for entry in owned:
        revoked = entry.get("revoked", [])
        print(f"  {entry['name']:<16} {entry.get('id', '?')}  revoked: {len(revoked)}" + (f" (list #{entry['revocation_seq']})" if revoked else ""))
        for peer in revoked:
            print(f"      revoked {peer}")
        if "error" in entry:
            print(f"      error: {entry['error']}")
    print(f"memberships held ({len(held)}):")
    for entry in held:
        if "org" in entry:
            roles = ", ".join(entry["roles"]) or "no roles"
            print(f"  {entry['org']:<16} {entry['id']}  {roles}  {entry['status']} until {_when(entry['expires'])}")
        else:
            print(f"  {entry['file']}: {entry['status']}")
    return EXIT_OK


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(seconds))


def register(sub: argparse._SubParsersAction, common) -> None:
    """Add ``modelnet org …`` to the command's subparsers."""
    org = sub.add_parser("org", help="organisations: create, issue and revoke memberships, join one")
    org_sub = org.add_subparsers(dest="org_command", required=True, metavar="ORG_COMMAND")

    def with_passphrase(p: argparse.ArgumentParser) -> None:
        common(p)
        p.add_argument("--passphrase-env", metavar="VAR", help="the key's passphrase is in this environment variable")

    p = org_sub.add_parser("create", help="make an organisation key in the keystore")
    with_passphrase(p)
    p.add_argument("name", help="a local label for the organisation (it is identified by its key's id)")
    p.set_defaults(func=cmd_create)

    p = org_sub.add_parser("issue", help="write a membership certificate for a member node")
    with_passphrase(p)
    p.add_argument("name", help="the organisation")
    p.add_argument("--member", required=True, help="the member node's peer id (12D3KooW…)")
    p.add_argument("--role", action="append", help="a role the member has (repeatable)")
    p.add_argument("--expires", default="30d", help="lifetime: 30d, 12h, 90m (default 30d, at most 365d)")
    p.add_argument("--out", help="file to write (default NAME-<member>.membership)")
    p.set_defaults(func=cmd_issue)

    p = org_sub.add_parser("join", help="install a membership file on this node")
    with_passphrase(p)
    p.add_argument("file", help="the .membership file the organisation issued")
    p.set_defaults(func=cmd_join)

    p = org_sub.add_parser("revoke", help="revoke a member and publish the signed revocation list")
    with_passphrase(p)
    p.add_argument("name", help="the organisation")
    p.add_argument("peer", help="the member's peer id")
    p.add_argument("--bootstrap", action="append", help="full address of a peer to publish through")
    p.add_argument("--timeout", type=float, default=15.0, help="seconds to join and publish")
    p.set_defaults(func=cmd_revoke)

    p = org_sub.add_parser("show", help="organisations owned, memberships held, revocations")
    common(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_show)
