"""The CLI side of the HTTP gateway: ``modelnet node --http …`` and ``modelnet gateway``.

``modelnet gateway`` is a light client (a fresh key, no DHT serving, nothing published)
joined through ``--bootstrap`` that serves the OpenAI API over the whole network. Both
print ``gateway listening on http://HOST:PORT/v1`` on stderr once the port is bound.
"""

from __future__ import annotations

import argparse
import sys

DEFAULT_HTTP = "127.0.0.1:8080"


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


def gateway_config(args: argparse.Namespace):
    """The gateway's config from ``--http`` and ``--api-key-file``; usage errors as CliError."""
    from modelnet.gateway import Config, ListenError, load_api_keys, parse_http_address

    from .main import EXIT_USAGE, CliError

    try:
        host, port = parse_http_address(args.http)
        keys = load_api_keys(args.api_key_file) if args.api_key_file else frozenset()
        return Config(host=host, port=port, api_keys=keys)
    except ListenError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


async def start_gateway(nursery, node, config) -> str:
    """Serve the gateway for ``node`` in ``nursery``; returns its URL."""
    from modelnet.gateway import Gateway, ListenError

    from .main import CliError

    try:
        url = await nursery.start(Gateway(node, config).serve)
    except ListenError as exc:
        raise CliError(str(exc)) from None
    print(f"gateway listening on {url}/v1", file=sys.stderr, flush=True)
    return url


def cmd_gateway(args: argparse.Namespace) -> int:
    import trio

    from .main import EXIT_OK, EXIT_USAGE, CliError, _client_session, bootstrap_addrs, home_dir, load_config

    config = gateway_config(args)
    bootstrap = bootstrap_addrs(args, load_config(home_dir(args)))
    if not bootstrap:
        raise CliError("no bootstrap address: pass --bootstrap /ip4/…/tcp/…/p2p/… (or set MODELNET_BOOTSTRAP)", EXIT_USAGE)

    async def serve(node, args: argparse.Namespace, progress) -> int:
        async with trio.open_nursery() as nursery:
            await start_gateway(nursery, node, config)
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
