"""Routed request overhead, one hop on loopback, and throughput through one provider.

Real libp2p hosts (TCP + Noise + Yamux) on 127.0.0.1, the echo backend, input "hello
world". Measured in the same run, N iterations each after a warm-up:

  (a)  the backend called directly (its async generator iterated to its Output);
  (b)  a raw stream round trip through our libp2p host: a new stream per request (open,
       write one frame, read the echoed frame, close);
  (b') one stream reused for every request (write, read);
  (c)  a routed request, ``client.ask("echo", text)`` with the provider list and the
       session grant cached: the steady state.

Then throughput: K concurrent askers on one client node against one provider node, with
the provider in this process and, separately, in a process of its own (so client and
provider each have a core). Finally a cProfile of (c), both ends in this process.

Run: ``python -m bench.overhead [--quick] [--n N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import os
import pstats
import subprocess
import sys
import time
from collections import Counter, defaultdict
from typing import Any, AsyncIterator, Awaitable, Callable

import psutil
import trio

from modelnet.models.base import Output
from modelnet.models.embedded import EchoBackend
from modelnet.p2p.libp2p_host import open_libp2p_host
from modelnet.identity import PeerID
from modelnet.p2p.host import split_full_address
from modelnet.p2p.node import Config, Node
from modelnet.p2p.streams import FramedStream
from modelnet.testing import open_node, seeded_key

from .common import Report, Summary, arguments, bar_verdict, ms, quiet_logging

TEXT = "hello world"
ECHO_PROTOCOL = "/bench/echo/1.0.0"
BAR_P50_MS = 2.0
BAR_P99_MS = 10.0
BAR_THROUGHPUT = 1000.0
# The client keeps its provider list for the whole run: (c) measures the steady state,
# not the DHT (bench/lookup.py does that).
CLIENT_CONFIG = Config(client_mode=True, provider_cache_ttl=1e9)
# The provider's per-asker limits (by default 8 requests at once and 600 a minute per peer,
# i.e. 10 req/s from one client) are policy, not capacity: lifted here, where one client
# node plays every asker. The total cap on concurrent requests is raised above the largest K.
PROVIDER_CONFIG = Config(max_concurrent_requests=64, max_requests_per_peer=64, requests_per_minute_per_peer=10**9)


def loopback_host(key):
    return open_libp2p_host(key, ["/ip4/127.0.0.1/tcp/0"])


async def timed(n: int, warmup: int, once: Callable[[], Awaitable[Any]]) -> list[float]:
    for _ in range(warmup):
        await once()
    samples = []
    clock = time.perf_counter
    for _ in range(n):
        started = clock()
        await once()
        samples.append(clock() - started)
    return samples


async def backend_once(backend: EchoBackend) -> Any:
    async with contextlib.aclosing(backend.run("echo", TEXT, {})) as items:
        async for item in items:
            if isinstance(item, Output):
                return item.value
    raise AssertionError("the echo backend ended without an Output")


async def _echo_frames(stream) -> None:
    async with FramedStream(stream) as framed:
        while (frame := await framed.receive()) is not None:
            await framed.send(frame)


@contextlib.asynccontextmanager
async def open_pair() -> AsyncIterator[tuple[PeerID, Node]]:
    """A provider node (echo) and a light client joined through it, both in this process."""
    async with open_node(loopback_host, seeded_key(1), [EchoBackend()], PROVIDER_CONFIG) as provider:
        provider.host.set_stream_handler(ECHO_PROTOCOL, _echo_frames)
        async with open_node(loopback_host, seeded_key(2), (), CLIENT_CONFIG, bootstrap=provider.addrs) as client:
            yield provider.peer_id, client


@contextlib.asynccontextmanager
async def open_remote_pair() -> AsyncIterator[tuple[PeerID, Node, psutil.Process]]:
    """The provider in a child process (``--serve``), the client here: each has a core."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "bench.overhead", "--serve"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    try:
        line = b""
        with trio.fail_after(60):
            while not line.endswith(b"\n"):
                chunk = await process.stdout.receive_some(4096)
                if not chunk:
                    raise RuntimeError("the provider process ended before printing its address")
                line += chunk
        address = line.decode().strip()
        async with open_node(loopback_host, seeded_key(3), (), CLIENT_CONFIG, bootstrap=[address]) as client:
            yield split_full_address(address)[1], client, psutil.Process(process.pid)
    finally:
        await process.stdin.aclose()  # the child stops when its stdin closes
        with trio.move_on_after(10):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()


async def serve_provider() -> None:
    """Child side of the two-process runs: serve until stdin closes."""
    async with open_node(loopback_host, seeded_key(1), [EchoBackend()], PROVIDER_CONFIG) as provider:
        provider.host.set_stream_handler(ECHO_PROTOCOL, _echo_frames)
        print(provider.addrs[0], flush=True)
        stdin = trio.lowlevel.FdStream(os.dup(0))
        async with stdin:
            while await stdin.receive_some(1024):
                pass


async def network_rows(peer: PeerID, client: Node, n: int, warmup: int) -> dict[str, Summary]:
    """Rows (b), (b') and (c) from ``client`` to the provider ``peer``."""
    payload = TEXT.encode()
    host = client.host
    rows: dict[str, Summary] = {}

    async def new_stream_once() -> None:
        async with FramedStream(await host.new_stream(peer, [ECHO_PROTOCOL])) as framed:
            await framed.send(payload)
            if await framed.receive() != payload:
                raise AssertionError("echo stream answered something else")

    rows["(b) raw stream, new per request"] = Summary.of_seconds(await timed(n, warmup, new_stream_once))
    async with FramedStream(await host.new_stream(peer, [ECHO_PROTOCOL])) as reused:

        async def reused_once() -> None:
            await reused.send(payload)
            if await reused.receive() != payload:
                raise AssertionError("echo stream answered something else")

        rows["(b') raw stream, one reused"] = Summary.of_seconds(await timed(n, warmup, reused_once))

    async def ask_once() -> None:
        answer = await client.ask("echo", TEXT)
        if answer.output != TEXT:
            raise AssertionError(f"echo answered {answer.output!r}")

    rows["(c) routed request (warm)"] = Summary.of_seconds(await timed(n, warmup, ask_once))
    return rows


async def measure_latency(report: Report, n: int, warmup: int) -> None:
    backend = EchoBackend()
    direct = Summary.of_seconds(await timed(n, warmup, lambda: backend_once(backend)))
    async with open_pair() as (peer, client):
        local = await network_rows(peer, client, n, warmup)
    async with open_remote_pair() as (peer, client, _child):
        remote = await network_rows(peer, client, n, warmup)
    rows = [["(a) backend directly", "-", *direct.row()]]
    rows += [[name, "same", *s.row()] for name, s in local.items()]
    rows += [[name, "two", *s.row()] for name, s in remote.items()]
    report.table(
        f"Latency, one hop on loopback ({n} iterations each after {warmup} warm-up)",
        ["row", "processes", *Summary.HEADERS],
        rows,
        note="'same': client and provider hosts in this process (the setting of the bar); "
        "'two': the provider in a child process.",
    )
    overhead_rows = []
    for where, measured in (("same", local), ("two", remote)):
        new, reused, routed = measured.values()
        for label, reference in (("(a) the backend", direct), ("(b) a new raw stream", new), ("(b') a reused stream", reused)):
            overhead_rows.append([
                f"(c) over {label}", where,
                *(ms(getattr(routed, q) - getattr(reference, q)) for q in ("p50", "p95", "p99", "mean")),
            ])
        overhead_rows.append(["(c) / (b)", where, *(f"{getattr(routed, q) / getattr(new, q):.2f}x" for q in ("p50", "p95", "p99", "mean"))])
    report.table(
        "Overhead of a routed request (differences of percentiles)",
        ["comparison", "processes", "p50 ms", "p95 ms", "p99 ms", "mean ms"],
        overhead_rows,
    )
    routed = local["(c) routed request (warm)"]
    p50_over, p99_over = routed.p50 - direct.p50, routed.p99 - direct.p99
    report.bar("routed overhead over the backend, one hop, p50 <= 2 ms", f"{ms(p50_over)} ms", bar_verdict(p50_over, BAR_P50_MS))
    report.bar("routed overhead over the backend, one hop, p99 <= 10 ms", f"{ms(p99_over)} ms", bar_verdict(p99_over, BAR_P99_MS))
    report.data["latency"] = {"backend": direct, "same_process": local, "two_processes": remote}


ERRORS_SEEN: Counter[str] = Counter()


async def drive(client: Node, concurrency: int, total: int) -> tuple[float, int, list[float]]:
    """``total`` asks spread over ``concurrency`` tasks; (wall seconds, errors, latencies).

    Errors are counted (and their kinds kept in ERRORS_SEEN): an error is a result here.
    """
    errors = 0
    latencies: list[float] = []
    per_task = [total // concurrency + (i < total % concurrency) for i in range(concurrency)]

    async def asker(count: int) -> None:
        nonlocal errors
        for _ in range(count):
            started = time.perf_counter()
            try:
                await client.ask("echo", TEXT)
            except Exception as exc:  # top of the task: an error is a result here, counted and reported
                errors += 1
                ERRORS_SEEN[f"{type(exc).__name__}: {exc}"[:160]] += 1
            else:
                latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for count in per_task:
            nursery.start_soon(asker, count)
    return time.perf_counter() - started, errors, latencies


def _throughput_row(where: str, k: int, total: int, wall: float, errors: int, latencies: list[float], client_cpu: float, provider_cpu: float | None) -> list[str]:
    done = total - errors
    s = Summary.of_seconds(latencies)
    return [
        where, str(k), str(total), f"{done / wall:.0f}", str(errors), ms(s.p50), ms(s.p99),
        ms(1000 * client_cpu / total), "-" if provider_cpu is None else ms(1000 * provider_cpu / total),
    ]


THROUGHPUT_HEADERS = ["processes", "K", "requests", "req/s", "errors", "p50 ms", "p99 ms", "client CPU ms/req", "provider CPU ms/req"]


async def measure_throughput(levels: list[int], total: int) -> list[list[str]]:
    rows = []
    async with open_pair() as (_peer, client):
        await drive(client, 1, 50)  # warm: provider list, grant, connection
        for k in levels:
            cpu0 = time.process_time()
            wall, errors, latencies = await drive(client, k, total)
            rows.append(_throughput_row("same", k, total, wall, errors, latencies, time.process_time() - cpu0, None))
    async with open_remote_pair() as (_peer, client, child):
        await drive(client, 1, 50)
        for k in levels:
            cpu0, child0 = time.process_time(), child.cpu_times()
            wall, errors, latencies = await drive(client, k, total)
            child1 = child.cpu_times()
            provider_cpu = (child1.user + child1.system) - (child0.user + child0.system)
            rows.append(_throughput_row("two", k, total, wall, errors, latencies, time.process_time() - cpu0, provider_cpu))
    return rows


COUNTED_CALLS = {
    "<method 'send' of '_socket.socket' objects>": "socket sends (one per Noise message)",
    "<method 'recv' of '_socket.socket' objects>": "socket recvs",
    "<method 'sign' of 'cryptography.hazmat.bindings._rust.openssl.ed25519.Ed25519PrivateKey' objects>": "Ed25519 signs",
    "<method 'verify' of 'cryptography.hazmat.bindings._rust.openssl.ed25519.Ed25519PublicKey' objects>": "Ed25519 verifies",
}


def profile_routed(report: Report, n: int) -> None:
    """cProfile of ``n`` warm routed requests and ``n`` raw new-stream round trips, both
    ends in this process: where the CPU goes, and how many messages each one costs."""
    profiles: dict[str, pstats.Stats] = {}

    async def run() -> None:
        async with open_pair() as (peer, client):
            await drive(client, 1, 100)
            payload = TEXT.encode()

            async def new_stream_once() -> None:
                async with FramedStream(await client.host.new_stream(peer, [ECHO_PROTOCOL])) as framed:
                    await framed.send(payload)
                    await framed.receive()

            for name, once in (("(b) raw new stream", new_stream_once), ("(c) routed", lambda: client.ask("echo", TEXT))):
                profiler = cProfile.Profile()
                profiler.enable()
                for _ in range(n):
                    await once()
                profiler.disable()
                profiles[name] = pstats.Stats(profiler)

    trio.run(run)
    counts = {name: {label: 0.0 for label in COUNTED_CALLS.values()} for name in profiles}
    for name, stats in profiles.items():
        for (_file, _line, function), entry in stats.stats.items():
            if function in COUNTED_CALLS:
                counts[name][COUNTED_CALLS[function]] += entry[1] / n
    report.table(
        "Work per request, both ends together (exact call counts)",
        ["what", *profiles],
        [[label, *(f"{counts[name][label]:.1f}" for name in profiles)] for label in COUNTED_CALLS.values()],
    )
    stats = profiles["(c) routed"]
    total = sum(entry[2] for entry in stats.stats.values())  # tottime
    by_area: dict[str, float] = defaultdict(float)
    for (filename, _line, _name), entry in stats.stats.items():
        by_area[_area(filename)] += entry[2]
    report.table(
        f"Where the CPU of a routed request goes (cProfile, {n} requests, both ends in one process)",
        ["code", "CPU ms/request (own time)", "share"],
        [[area, ms(1000 * t / n), f"{100 * t / total:.1f} %"] for area, t in sorted(by_area.items(), key=lambda x: -x[1])],
        note="Own time (tottime) grouped by where the function lives; profiling inflates small calls.",
    )
    top = sorted(stats.stats.items(), key=lambda item: -item[1][2])[:15]
    report.table(
        "Top 15 functions of a routed request by own time",
        ["function", "calls/request", "own ms/request", "cumulative ms/request"],
        [[f"{_short(f)}:{line}:{name}", f"{e[1] / n:.1f}", ms(1000 * e[2] / n), ms(1000 * e[3] / n)] for (f, line, name), e in top],
        note="cProfile counts every resumption of a coroutine as a call.",
    )
    report.data["profile_by_area"] = {area: t / n for area, t in by_area.items()}
    report.data["work_per_request"] = counts


def _area(filename: str) -> str:
    path = filename.replace("\\", "/")
    for marker, area in (
        ("/libp2p/stream_muxer/", "libp2p yamux"),
        ("/libp2p/security/", "libp2p noise"),
        ("/libp2p/", "libp2p (other)"),
        ("/trio/", "trio"),
        ("/cryptography/", "cryptography"),
        ("/msgpack/", "msgpack"),
        ("/work/main/p2p/", "modelnet p2p"),
        ("/work/main/protocols/", "modelnet protocols"),
        ("/work/main/identity/", "modelnet identity"),
        ("/work/main/models/", "modelnet models"),
    ):
        if marker in path:
            return area
    if path.startswith("~") or "<" in path:
        return "builtins"
    if "/site-packages/" in path:
        return "site-packages (other)"
    return "stdlib"


def _short(filename: str) -> str:
    for marker in ("/site-packages/", "/work/main/", "/lib/python3.11/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def main() -> None:
    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--n", type=int, help="iterations per latency row (default 2000, quick 300)")
        parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the child of the 2-process run

    args = arguments(__doc__.split("\n")[0], options)
    quiet_logging()
    if args.serve:
        trio.run(serve_provider)
        return
    n = args.n or (300 if args.quick else 2000)
    warmup = max(50, n // 10)
    total = 600 if args.quick else 4000
    levels = [1, 8, 32]
    report = Report("overhead", "Routed request overhead, one hop on loopback", {
        "quick": args.quick,
        "iterations": n, "warmup": warmup, "input": TEXT, "backend": "EchoBackend()",
        "throughput_requests": total, "concurrency": levels, "transport": "libp2p TCP+Noise+Yamux on 127.0.0.1",
        "provider_limits": "max_concurrent_requests=64, per-peer limits lifted (one client plays every asker)",
    })
    trio.run(measure_latency, report, n, warmup)
    rows = trio.run(measure_throughput, levels, total)
    report.table(
        "Throughput through one provider node (echo backend)",
        THROUGHPUT_HEADERS,
        rows,
        note="K asker tasks on one light client node. 'same': client and provider share one "
        "Python thread (one core between them); 'two': the provider runs in a child process.",
    )
    best = max(float(r[3]) for r in rows if r[0] == "two")
    report.bar("throughput through one node >= 1,000 req/s (provider in its own process, best K)",
               f"{best:.0f} req/s", bar_verdict(best, BAR_THROUGHPUT, higher_is_better=True))
    for error, count in ERRORS_SEEN.most_common(5):
        report.note(f"throughput run error x{count}: {error}")
    report.data["throughput"] = [dict(zip(THROUGHPUT_HEADERS, r)) for r in rows]
    profile_routed(report, min(n, 1000))
    report.write()


if __name__ == "__main__":
    main()
