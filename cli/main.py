"""The ``modelnet`` command.

    modelnet init                         make a node identity and config in a home folder
    modelnet node [--bootstrap ADDR]      run a node that serves the embedded models
    modelnet find CAPABILITY              list verified providers of a capability
    modelnet ask CAPABILITY TEXT          route a request to the best provider
    modelnet ask --via ADDR CAP TEXT      send it through a forwarding peer, no DHT of our own
    modelnet ask --plan FILE TEXT         run a collaborative plan (YAML/JSON) on TEXT
    modelnet demo                         a local network on loopback, end to end
    modelnet swarm-key FILE               make a pre-shared key that closes a private swarm
    modelnet org create|issue|join|revoke|show   organisations and memberships

Exit codes: 0 success, 1 the network failed us (unreachable bootstrap, every provider
failed), 2 bad input (usage, address, text), 3 no provider of the capability.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from modelnet import __version__
from modelnet.errors import ModelNetError, sole_error

from . import gateway as gateway_cli
from . import render

EXIT_OK = 0
EXIT_NETWORK = 1
EXIT_USAGE = 2
EXIT_NO_PROVIDER = 3

DEFAULT_HOME = Path.home() / ".modelnet"
KEY_FILE = "node.key"
CONFIG_FILE = "config.json"
DEFAULT_LISTEN = "/ip4/127.0.0.1/tcp/0"


class CliError(ModelNetError):
    """A failure the CLI reports as one line and an exit code."""

    def __init__(self, message: str, code: int = EXIT_NETWORK) -> None:
        super().__init__(message)
        self.code = code


def home_dir(args: argparse.Namespace) -> Path:
    return Path(args.home or os.environ.get("MODELNET_HOME") or DEFAULT_HOME).expanduser()


def load_config(home: Path) -> dict[str, Any]:
    path = home / CONFIG_FILE
    if not path.exists():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read {path}: {exc}", EXIT_USAGE) from None
    if not isinstance(config, dict):
        raise CliError(f"{path} must hold a JSON object", EXIT_USAGE)
    return config


def passphrase(args: argparse.Namespace) -> str | None:
    var = getattr(args, "passphrase_env", None)
    if not var:
        return None
    value = os.environ.get(var)
    if value is None:
        raise CliError(f"environment variable {var} (--passphrase-env) is not set", EXIT_USAGE)
    return value


def bootstrap_addrs(args: argparse.Namespace, config: dict[str, Any]) -> list[str]:
    addrs = list(args.bootstrap or [])
    if not addrs and os.environ.get("MODELNET_BOOTSTRAP"):
        addrs = os.environ["MODELNET_BOOTSTRAP"].split(",")
    if not addrs:
        addrs = list(config.get("bootstrap", []))
    return full_addrs(addrs)


def full_addrs(addrs: Sequence[str]) -> list[str]:
    """``addrs`` if each is a full address (``…/p2p/<id>``); a usage error otherwise."""
    from modelnet.p2p.errors import BadAddress
    from modelnet.p2p.host import split_full_address

    for addr in addrs:
        try:
            split_full_address(addr)
        except BadAddress as exc:
            raise CliError(str(exc), EXIT_USAGE) from None
    return list(addrs)


def swarm_key(args: argparse.Namespace):
    """The private swarm's key from ``--swarm-key FILE`` (None: the open network)."""
    path = getattr(args, "swarm_key", None)
    if not path:
        return None
    from modelnet.p2p.pnet import SwarmKeyError, load_swarm_key

    try:
        return load_swarm_key(Path(path).expanduser())
    except SwarmKeyError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


# -- commands ---------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    from modelnet.identity import keystore

    home = home_dir(args)
    key_path = home / KEY_FILE
    if key_path.exists() and not args.force:
        key = keystore.load_key(key_path, passphrase(args))
        print(f"{home} already holds node {key.peer_id} (use --force to replace it)")
        return EXIT_OK
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    from modelnet.identity import PrivateKey

    key = PrivateKey.generate()
    keystore.save_key(key_path, key, passphrase(args))
    config_path = home / CONFIG_FILE
    if not config_path.exists() or args.force:
        config = {"listen": [args.listen or "/ip4/127.0.0.1/tcp/4001"], "bootstrap": list(args.bootstrap or []), "models": ["embedded"]}
        config_path.write_text(json.dumps(config, indent=2) + "\n")
    print(f"node {key.peer_id}")
    print(f"key    {key_path} (mode 600{', encrypted' if passphrase(args) else ''})")
    print(f"config {config_path}")
    return EXIT_OK


def cmd_node(args: argparse.Namespace) -> int:
    import trio

    from modelnet.identity import keystore

    home = home_dir(args)
    config = load_config(home)
    key_path = home / KEY_FILE
    if not key_path.exists():
        raise CliError(f"no node key in {home}: run `modelnet init --home {home}` first", EXIT_USAGE)
    key = keystore.load_key(key_path, passphrase(args))
    listen = args.listen or config.get("listen") or [DEFAULT_LISTEN]
    specs = args.model or config.get("models") or ["embedded"]
    if not isinstance(specs, list) or not all(isinstance(spec, str) and spec for spec in specs):
        raise CliError(f"{home / CONFIG_FILE}: models must be a list of backend specs", EXIT_USAGE)
    bootstrap = bootstrap_addrs(args, config)
    from modelnet.models.registry import load_backends

    backends = load_backends(specs)
    from .org import installed_memberships, owned_revocations

    upstream = full_addrs(args.upstream or [])
    trust = dict(memberships=installed_memberships(home, now=time.time()), revocations=owned_revocations(home, now=time.time()))
    trio.run(_run_node, key, listen, backends, bootstrap, args, specs, trust, upstream)
    return EXIT_OK


async def _run_node(key, listen, backends, bootstrap, args, specs, trust, upstream=()) -> None:
    import trio

    from modelnet.models.base import UpstreamError
    from modelnet.models.registry import discover_models
    from modelnet.p2p.libp2p_host import open_libp2p_host
    from modelnet.p2p.node import Config, Node

    progress = render.Progress(sys.stderr)
    http = gateway_cli.gateway_setup(args)
    # Some backends (openai:<url> without #model) learn their models from their server;
    # the node publishes what they serve, and policies name them, so that comes first.
    try:
        await discover_models(backends, specs)
    except UpstreamError as exc:
        raise CliError(str(exc)) from None
    from .org import parse_policies

    policies = parse_policies(args.policy or [], {info.name for backend in backends for info in backend.models()})
    async with open_libp2p_host(key, listen, swarm_key=swarm_key(args)) as host:
        config = Config(
            forwarding=args.forward or bool(upstream),
            upstream=tuple(upstream),
            relays=tuple(full_addrs(args.relay or [])),
            relay_service=args.relay_service,
        )
        node = Node(host, key, backends, config, memberships=trust["memberships"], policies=policies, revocations=trust["revocations"])
        for addr in node.addrs:
            print(f"listening on {addr}", flush=True)
        async with trio.open_nursery() as nursery:
            if bootstrap:
                progress.step(f"joining through {len(bootstrap)} bootstrap peer(s)")
            await _start(nursery, node, bootstrap, args.timeout)
            if bootstrap:
                progress.done(f"joined: {len(node.dht.routing_table)} peers in the routing table")
            for addr in node.addrs:
                if "/p2p-circuit" in addr:
                    print(f"reachable through a relay at {addr}", flush=True)
            progress.step("loading models and publishing capabilities")
            await node.wait_warm()
            await node.wait_published()
            tags = sorted(node.capability_record().capability_tags())
            progress.done(f"serving {len(tags)} capabilities: {', '.join(tags)}")
            if http is not None:
                await gateway_cli.start_gateway(nursery, node, http)
            print("ready", flush=True)


async def _start(nursery, node, bootstrap: Sequence[str], timeout: float) -> None:
    """Start the node in ``nursery``, joined through ``bootstrap``; one-line errors."""
    import trio

    from modelnet.p2p.errors import P2PError

    try:
        with trio.fail_after(timeout):
            await nursery.start(node.serve, bootstrap)
    except trio.TooSlowError:
        raise CliError(f"bootstrap peer(s) {', '.join(bootstrap)} did not answer within {timeout:g}s") from None
    except P2PError as exc:
        raise CliError(f"cannot join the network: {exc}") from None


def cmd_find(args: argparse.Namespace) -> int:
    return _run_client(args, _find)


def cmd_ask(args: argparse.Namespace) -> int:
    if args.plan is not None:
        # With a plan the one positional argument is the text.
        if args.text is not None or args.capability is None:
            raise CliError("with --plan, give only the text: modelnet ask --plan FILE TEXT", EXIT_USAGE)
        if args.model or args.param:
            raise CliError("--model and --param go into the plan file's steps, not beside --plan", EXIT_USAGE)
        args.text, args.capability = args.capability, None
        from .plan_file import PlanFileError, load_plan_file

        try:
            args.plan_tree = load_plan_file(args.plan)
        except PlanFileError as exc:
            raise CliError(str(exc), EXIT_USAGE) from None
    elif args.capability is None or args.text is None:
        raise CliError("ask needs a capability and a text (or --plan FILE and a text)", EXIT_USAGE)
    if not args.text.strip():
        raise CliError("the text to ask about is empty", EXIT_USAGE)
    return _run_client(args, _ask_plan if args.plan is not None else _ask)


def _run_client(args: argparse.Namespace, action) -> int:
    import trio

    from modelnet.protocols.capability import normalize_tag
    from modelnet.protocols.errors import ProtocolError

    try:
        if args.capability is not None:  # None with --plan
            normalize_tag(args.capability)
    except ProtocolError as exc:
        raise CliError(f"bad capability {args.capability!r}: {exc}", EXIT_USAGE) from None
    config = load_config(home_dir(args))
    via = full_addrs(getattr(args, "via", None) or [])
    if via:  # a light client with no DHT: the forwarder routes for us
        return trio.run(_via_session, args, via, action)
    bootstrap = bootstrap_addrs(args, config)
    if not bootstrap:
        raise CliError("no bootstrap address: pass --bootstrap /ip4/…/tcp/…/p2p/… (or set MODELNET_BOOTSTRAP)", EXIT_USAGE)
    return trio.run(_client_session, args, bootstrap, action)


async def _client_session(args: argparse.Namespace, bootstrap: list[str], action) -> int:
    import trio

    from modelnet.identity import PrivateKey
    from modelnet.p2p.libp2p_host import open_libp2p_host
    from modelnet.p2p.node import Config, Node

    from .org import installed_memberships

    # A light client: no DHT serving, nothing published; a fresh key, unless this home
    # holds memberships: certificates are bound to the node's id, so a member asks as it.
    home = home_dir(args)
    memberships = installed_memberships(home, now=time.time())
    if memberships:
        from modelnet.identity import keystore

        key = keystore.load_key(home / KEY_FILE, passphrase(args))
    else:
        key = PrivateKey.generate()
    progress = render.Progress(sys.stderr, quiet=args.json)
    async with open_libp2p_host(key, [DEFAULT_LISTEN], swarm_key=swarm_key(args)) as host:
        node = Node(host, key, (), Config(client_mode=True), memberships=memberships)
        async with trio.open_nursery() as nursery:
            progress.step(f"joining through {bootstrap[0]}")
            await _start(nursery, node, bootstrap, args.timeout)
            progress.done(f"joined: {len(node.dht.routing_table)} peers known")
            code = await action(node, args, progress)
            nursery.cancel_scope.cancel()
            return code


async def _via_session(args: argparse.Namespace, via: list[str], action) -> int:
    from modelnet.identity import PrivateKey
    from modelnet.p2p.libp2p_host import open_libp2p_host
    from modelnet.p2p.node import Config, Node

    key = PrivateKey.generate()
    progress = render.Progress(sys.stderr, quiet=args.json)
    async with open_libp2p_host(key, [DEFAULT_LISTEN], swarm_key=swarm_key(args)) as host:
        node = Node(host, key, (), Config(client_mode=True))
        return await action(node, args, progress)


async def _find(node, args: argparse.Namespace, progress: render.Progress) -> int:
    import trio

    progress.step(f"looking up {args.capability}")
    try:
        with trio.fail_after(args.timeout):
            providers = await node.find(args.capability)
    except trio.TooSlowError:
        raise CliError(f"looking up {args.capability!r} took longer than {args.timeout:g} s") from None
    progress.done(f"{len(providers)} verified provider(s)")
    if args.json:
        print(json.dumps({"capability": args.capability, "providers": [render.provider_json(p) for p in providers]}, indent=2))
    else:
        print(render.providers_table(providers))
    return EXIT_OK if providers else EXIT_NO_PROVIDER


async def _ask(node, args: argparse.Namespace, progress: render.Progress) -> int:
    from modelnet.p2p.node import NoProvider, RequestFailed

    params = parse_params(args.param or [])
    streamed = not args.json and sys.stdout.isatty()

    def on_chunk(peer, text: str) -> None:
        if streamed:
            print(text, end=" ", flush=True)

    progress.step(f"asking {args.capability}")
    try:
        answer = await node.ask(
            args.capability, args.text, params, model=args.model, timeout=args.timeout, on_chunk=on_chunk, via=args.via or ()
        )
    except NoProvider as exc:
        raise CliError(str(exc), EXIT_NO_PROVIDER) from None
    except RequestFailed as exc:
        from modelnet.protocols.reason import INVALID_INPUT

        details = "; ".join(f"{peer.short()}: {why}" for peer, why in exc.errors) if len(exc.errors) > 1 else ""
        code = EXIT_USAGE if exc.code == INVALID_INPUT else EXIT_NETWORK
        raise CliError(f"{exc}" + (f" ({details})" if details else ""), code) from None
    through = f" via {' -> '.join(peer.short() for peer in answer.route)}" if answer.route else ""
    progress.done(f"answered by {answer.provider} ({answer.model}){through} in {answer.elapsed * 1000:.0f} ms")
    if streamed and answer.chunks:
        print()
    if args.json:
        print(json.dumps(render.answer_json(answer), indent=2))
    else:
        print(render.output_text(answer.output))
    return EXIT_OK


async def _ask_plan(node, args: argparse.Namespace, progress: render.Progress) -> int:
    from modelnet.p2p.plans import PlanFailed, execute

    progress.step(f"running {args.plan}")
    try:
        result = await execute(node, args.plan_tree, args.text, timeout=args.timeout, on_event=render.PlanProgress(progress))
    except PlanFailed as exc:
        if args.json:
            print(json.dumps(render.trace_json(exc.trace, exc.decisions), indent=2))
        raise CliError(f"the plan failed: {exc}") from None
    progress.done(f"plan answered in {result.elapsed * 1000:.0f} ms by {len(result.trace.steps)} model calls")
    if args.json:
        print(json.dumps(render.trace_json(result.trace, result.decisions, result.elapsed), indent=2))
    else:
        print(render.output_text(result.output))
        if not progress.quiet:
            print(render.trace_table(result.trace), file=sys.stderr)
    return EXIT_OK


def parse_params(items: Sequence[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise CliError(f"--param takes NAME=VALUE, got {item!r}", EXIT_USAGE)
        try:
            params[name] = json.loads(value)
        except ValueError:
            params[name] = value
        if isinstance(params[name], (list, dict)):
            params[name] = value
    return params


def cmd_swarm_key(args: argparse.Namespace) -> int:
    from modelnet.p2p.pnet import SwarmKey, SwarmKeyError, write_swarm_key

    key = SwarmKey.generate()
    try:
        write_swarm_key(Path(args.file).expanduser(), key)
    except SwarmKeyError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    print(f"swarm key {key.fingerprint} written to {args.file} (mode 600)")
    print(f"give it to every node of the swarm: modelnet node --swarm-key {args.file} …")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    import trio

    from .demo import run_demo

    return trio.run(run_demo, args.nodes, args.json)


# -- entry point ----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelnet", description="A peer-to-peer network of AI models.")
    parser.add_argument("--version", action="version", version=f"modelnet {__version__}")
    parser.add_argument("--log-level", default=os.environ.get("MODELNET_LOG", "WARNING"), help="logging level (default WARNING)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--home", help=f"node home folder (default $MODELNET_HOME or {DEFAULT_HOME})")
        p.add_argument("--swarm-key", metavar="FILE", help="join only the private swarm of this pre-shared key (modelnet swarm-key)")

    p = sub.add_parser("init", help="create a node identity and config")
    common(p)
    p.add_argument("--listen", help="listen address written to the config (default /ip4/127.0.0.1/tcp/4001)")
    p.add_argument("--bootstrap", action="append", help="bootstrap address written to the config (repeatable)")
    p.add_argument("--passphrase-env", metavar="VAR", help="encrypt the key with the passphrase in this environment variable")
    p.add_argument("--force", action="store_true", help="replace an existing identity")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("node", help="run a node")
    common(p)
    p.add_argument("--listen", action="append", help="multiaddr to listen on (repeatable; default from config)")
    p.add_argument("--bootstrap", action="append", help="full address of a peer to join through (repeatable)")
    p.add_argument("--model", action="append", help="backend spec (repeatable): embedded, embedded:NAME, echo, openai:URL[#MODEL,…] "
        "(an OpenAI-compatible server; API key from $MODELNET_OPENAI_API_KEY or ?key_env=VAR), or a plug-in NAME[:ARG]")
    p.add_argument("--passphrase-env", metavar="VAR", help="read the key's passphrase from this environment variable")
    p.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for the bootstrap peers")
    gateway_cli.add_http_arguments(p)
    p.add_argument("--policy", action="append", metavar="MODEL=POLICY", help="who may use MODEL: public, org:<id>[:role=<r>], peer:<id>, comma-combined (repeatable)")
    p.add_argument("--forward", action="store_true", help="route requests for capabilities this node does not serve")
    p.add_argument("--upstream", action="append", metavar="ADDR", help="a forwarding peer for what the DHT can't find (repeatable; implies --forward)")
    p.add_argument("--relay", action="append", metavar="ADDR", help="reserve a slot on this circuit relay (full address; repeatable): "
        "for a node others cannot dial, which then advertises …/p2p/<relay>/p2p-circuit")
    p.add_argument("--relay-service", action="store_true", help="act as a circuit relay v2 for peers that cannot be dialled")
    p.set_defaults(func=cmd_node)

    for name, func, helptext in (("find", cmd_find, "list providers of a capability"), ("ask", cmd_ask, "ask the network")):
        p = sub.add_parser(name, help=helptext)
        common(p)
        if name == "find":
            p.add_argument("capability", help="what to ask for: a task (sentiment), model:NAME, or a tag")
        if name == "ask":
            p.add_argument("capability", nargs="?", help="what to ask for: a task (sentiment), model:NAME, or a tag")
            p.add_argument("text", nargs="?", help="the input text")
            p.add_argument("--plan", metavar="FILE", help="run the plan in this YAML/JSON file on the text (no capability)")
            p.add_argument("--model", help="only this model")
            p.add_argument("--param", action="append", metavar="NAME=VALUE", help="model parameter (repeatable)")
            p.add_argument("--via", action="append", metavar="ADDR", help="send the request through this forwarding peer instead of the DHT (repeatable)")
        p.add_argument("--bootstrap", action="append", help="full address of a peer to join through")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.add_argument("--timeout", type=float, default=15.0, help="seconds for the whole operation")
        p.add_argument("--passphrase-env", metavar="VAR", help="passphrase of the node key (used when memberships are installed)")
        p.set_defaults(func=func)

    gateway_cli.add_gateway_command(sub, common)

    p = sub.add_parser("swarm-key", help="write a new pre-shared key for a private swarm")
    p.add_argument("file", help="where to write it (mode 600; never overwritten)")
    p.set_defaults(func=cmd_swarm_key)

    p = sub.add_parser("demo", help="run a local network on loopback and route requests through it")
    p.add_argument("--nodes", type=int, default=4, help="provider nodes to start (default 4)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_demo)

    from .org import register as register_org

    register_org(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        try:
            return args.func(args)
        except BaseExceptionGroup as group:
            # trio nurseries wrap what their tasks raise; report the error itself.
            raise sole_error(group) from None
    except CliError as exc:
        print(f"modelnet: error: {exc}", file=sys.stderr)
        return exc.code
    except ModelNetError as exc:
        print(f"modelnet: error: {exc}", file=sys.stderr)
        return EXIT_USAGE if _is_input_error(exc) else EXIT_NETWORK
    except KeyboardInterrupt:
        print("modelnet: interrupted", file=sys.stderr)
        return 130


def _is_input_error(exc: ModelNetError) -> bool:
    from modelnet.identity import IdentityError
    from modelnet.models.base import ModelError
    from modelnet.p2p.errors import BadAddress
    from modelnet.protocols.errors import LocalProtocolError

    return isinstance(exc, (IdentityError, ModelError, BadAddress, LocalProtocolError))


if __name__ == "__main__":
    sys.exit(main())
