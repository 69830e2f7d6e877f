"""The CLI side of the HTTP gateway: ``modelnet node --http …`` and ``modelnet gateway``.

``modelnet gateway`` is a light client (a fresh key, no DHT serving, nothing published)
joined through ``--bootstrap`` that serves the OpenAI API over the whole network. Both
print ``gateway listening on http://HOST:PORT/v1`` on stderr once the port is bound.
``--plan NAME=FILE`` (repeatable) serves a plan file as the model ``NAME``.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from typing import Any

DEFAULT_HTTP = "127.0.0.1:8080"
# A plan's name is a model id in requests: no "task:" prefix (that names capabilities).
_PLAN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclasses.dataclass(frozen=True)
class GatewaySetup:
    """What ``--http``, ``--api-key-file`` and ``--plan`` ask for."""

    config: Any  # modelnet.gateway.Config
    plans: dict[str, Any]  # name -> plan tree


def add_http_arguments(parser: argparse.ArgumentParser, *, required: bool = False) -> None:
    parser.add_argument(
        "--http",
        metavar="HOST:PORT",
        default=DEFAULT_HTTP if required else None,
        help="serve the OpenAI-compatible API here" + (f" (default {DEFAULT_HTTP})" if required else ""),
    )
    parser.add_argument(
        "--api-key-file",
        metavar="FILE",
        help="API keys clients must send as 'Authorization: Bearer KEY', one per line (required beyond loopback)",
    )
    parser.add_argument(
        "--plan",
        action="append",
        metavar="NAME=FILE",
        help="serve the plan in this YAML/JSON file as the model NAME (repeatable; needs --http)",
    )
    parser.add_argument(
        "--allowed-host",
        action="append",
        metavar="NAME",
        help="a name clients may use in the Host header besides the bound address (a proxy's; repeatable)",
    )
    parser.add_argument(
        "--serve-private",
        action="store_true",
        help="let HTTP clients use this node's private models and its organisations' memberships "
        "(every client then acts with the node's authority; off: they ask as an anonymous peer)",
    )


def gateway_setup(args: argparse.Namespace) -> GatewaySetup | None:
    """The gateway asked for by ``--http`` and its options (None: no ``--http``); usage
    errors as CliError, before anything starts."""
    from modelnet.gateway import Config, ListenError, load_api_keys, parse_http_address

    from .main import EXIT_USAGE, CliError

    if not args.http:
        if args.plan or args.api_key_file or args.allowed_host or args.serve_private:
            raise CliError(
                "--plan, --api-key-file, --allowed-host and --serve-private configure the HTTP gateway: add --http HOST:PORT",
                EXIT_USAGE,
            )
        return None
    try:
        host, port = parse_http_address(args.http)
        keys = load_api_keys(args.api_key_file) if args.api_key_file else frozenset()
        config = Config(
            host=host, port=port, api_keys=keys, allowed_hosts=tuple(args.allowed_host or ()), serve_private=args.serve_private
        )
    except ListenError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    return GatewaySetup(config, load_plans(args.plan or []))


def load_plans(items: list[str]) -> dict[str, Any]:
    """``NAME=FILE`` options into ``{name: plan tree}``, each file loaded and validated."""
    from .main import EXIT_USAGE, CliError
    from .plan_file import PlanFileError, load_plan_file

    plans: dict[str, Any] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise CliError(f"--plan takes NAME=FILE (e.g. triage=triage.yaml), got {item!r}", EXIT_USAGE)
        if not _PLAN_NAME.fullmatch(name):
            raise CliError(f"--plan {name!r}: a plan name is 1..64 of letters, digits . _ - (not starting with . _ -)", EXIT_USAGE)
        if name in plans:
            raise CliError(f"--plan {name!r} is given twice", EXIT_USAGE)
        try:
            plans[name] = load_plan_file(path)
        except PlanFileError as exc:
            raise CliError(f"--plan {name}: {exc}", EXIT_USAGE) from None
    return plans


async def start_gateway(nursery, node, setup: GatewaySetup) -> str:
    """Serve the gateway for ``node`` in ``nursery``; returns its URL."""
    from modelnet.gateway import Gateway, ListenError

    from .main import CliError

    try:
        url = await nursery.start(Gateway(node, setup.config, plans=setup.plans).serve)
    except ListenError as exc:
        raise CliError(str(exc)) from None
    if setup.config.serve_private:
        print("--serve-private: every HTTP client acts with this node's authority (its private models and organisations)",
              file=sys.stderr, flush=True)  # fmt: skip
    for name in setup.plans:
        print(f"plan {name} served as model {name!r}", file=sys.stderr, flush=True)
    print(f"gateway listening on {url}/v1", file=sys.stderr, flush=True)
    return url


def cmd_gateway(args: argparse.Namespace) -> int:
    import trio

    from .main import EXIT_OK, EXIT_USAGE, CliError, _client_session, bootstrap_addrs, home_dir, load_config

    setup = gateway_setup(args)
    bootstrap = bootstrap_addrs(args, load_config(home_dir(args)))
    if not bootstrap:
        raise CliError("no bootstrap address: pass --bootstrap /ip4/…/tcp/…/p2p/… (or set MODELNET_BOOTSTRAP)", EXIT_USAGE)

    async def serve(node, args: argparse.Namespace, progress) -> int:
        async with trio.open_nursery() as nursery:
            await start_gateway(nursery, node, setup)
            print("ready", flush=True)
            await trio.sleep_forever()
        return EXIT_OK

    return trio.run(_client_session, args, bootstrap, serve)


def add_gateway_command(sub, common) -> None:
    p = sub.add_parser("gateway", help="serve the OpenAI API over the network from a light client")
    common(p)
    p.add_argument("--bootstrap", action="append", help="full address of a peer to join through (repeatable)")
    add_http_arguments(p, required=True)
    p.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for the bootstrap peers")
    p.set_defaults(func=cmd_gateway, json=False)
