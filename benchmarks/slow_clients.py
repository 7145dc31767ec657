"""Slow clients against AnyDoor Serve: does ``/health/live`` stay fast while N slow connections are held?

    python benchmarks/slow_clients.py                      # starts a demo server itself (CPU)
    python benchmarks/slow_clients.py --url http://127.0.0.1:8000 --clients 300 --duration 20
    python benchmarks/slow_clients.py --server-env ANYDOOR_MAX_CONNECTIONS=256   # 300 clients past the cap

Keeps N slow connections open, of four kinds in turn: ``idle`` (connects, sends nothing), ``head`` (sends a request
head one byte a second), ``trickle`` (a whole /predict head, then the body one byte a second) and ``stall`` (a
head and the start of the body, then nothing). Each one the server closes is counted and replaced at once, so N
stay held throughout. Meanwhile a probe opens a new connection every ``--interval`` seconds (as an orchestrator's
probe does), sends ``GET /health/live`` and times it to the end of the answer. Prints one line::

    slow clients 300 held, health p50 2.1 ms p99 9.8 ms max 14.0 ms, closed by deadline 412, refused 0

"closed by deadline": connections the server closed after holding them at least half a second (its deadlines,
and evictions at the connection cap); "refused": closed sooner, or not accepted. A failed or timed-out probe
counts at its elapsed time. Exit status 1 if the slowest probe took over a second or any probe failed. The
server this script starts (demo mode, CPU) gets room for all N slow clients unless ``--server-env`` says
otherwise.
:func:`measure` is the same measurement for other scripts and tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
KINDS = ("idle", "head", "trickle", "stall")
PROBE_TIMEOUT_S = 5.0
SLOW_BYTE_INTERVAL_S = 1.0
REFUSED_WITHIN_S = 0.5
_HEAD = b"GET /health/live HTTP/1.1\r\nHost: anydoor\r\nUser-Agent: slow-clients\r\nAccept: */*\r\n\r\n"
_BODY_HEAD = (b"POST /predict HTTP/1.1\r\nHost: anydoor\r\nContent-Type: multipart/form-data; boundary=slowclients\r\n"
              b"Content-Length: 10000000\r\n\r\n")


@dataclass
class _Tally:
    open_now: int = 0
    opened: int = 0
    closed_by_deadline: int = 0
    refused: int = 0
    held: list[int] = field(default_factory=list)  # open_now at each probe
    latencies_s: list[float] = field(default_factory=list)
    probe_failures: int = 0


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


async def _behave(kind: str, writer: asyncio.StreamWriter, stop: asyncio.Event) -> None:
    if kind == "head":
        for i in range(len(_HEAD)):
            writer.write(_HEAD[i:i + 1])
            await writer.drain()
            await asyncio.sleep(SLOW_BYTE_INTERVAL_S)
    elif kind == "trickle":
        writer.write(_BODY_HEAD)
        while True:
            writer.write(b"-")
            await writer.drain()
            await asyncio.sleep(SLOW_BYTE_INTERVAL_S)
    elif kind == "stall":
        writer.write(_BODY_HEAD + b"--slowclients\r\n")
        await writer.drain()
    await stop.wait()


async def _slow_client(kind: str, host: str, port: int, tally: _Tally, stop: asyncio.Event) -> None:
    """One slow connection of ``kind``, replaced whenever the server closes it, until ``stop``."""
    while not stop.is_set():
        started = time.monotonic()
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            tally.refused += 1
            await asyncio.sleep(0.1)
            continue
        tally.opened += 1
        tally.open_now += 1
        sender = asyncio.create_task(_behave(kind, writer, stop))
        # Only the end of the stream (or a reset) means the server gave up on us. An answer alone does not: the
        # service answers an upload it cannot take now (429) at once, and a slow client could go on sending.
        reading = asyncio.create_task(reader.read())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({reading, stopping, sender}, return_when=asyncio.FIRST_COMPLETED)
        closed_by_server = reading.done() or (sender.done() and sender.exception() is not None)
        for task in (sender, reading, stopping):
            task.cancel()
        await asyncio.gather(sender, reading, stopping, return_exceptions=True)
        tally.open_now -= 1
        writer.close()
        if closed_by_server and not stop.is_set():
            if time.monotonic() - started < REFUSED_WITHIN_S:
                tally.refused += 1
                await asyncio.sleep(0.05)  # do not spin against a full server
            else:
                tally.closed_by_deadline += 1


async def _probe_once(host: str, port: int) -> bool:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"GET /health/live HTTP/1.1\r\nHost: anydoor\r\nConnection: close\r\n\r\n")
        await writer.drain()
        answer = await reader.read()  # to the end: the server closes after the answer
        return answer.startswith(b"HTTP/1.1 200")
    finally:
        writer.close()


async def _probe(host: str, port: int, interval_s: float, tally: _Tally, stop: asyncio.Event) -> None:
    while not stop.is_set():
        started = time.monotonic()
        try:
            ok = await asyncio.wait_for(_probe_once(host, port), PROBE_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError):
            ok = False
        tally.latencies_s.append(time.monotonic() - started)
        tally.held.append(tally.open_now)
        tally.probe_failures += not ok
        await asyncio.sleep(interval_s)


async def _measure(url: str, clients: int, duration_s: float, interval_s: float, ramp_s: float) -> dict[str, Any]:
    host, _, port = url.removeprefix("http://").rstrip("/").partition(":")
    tally = _Tally()
    stop = asyncio.Event()
    tasks = [asyncio.create_task(_slow_client(KINDS[i % len(KINDS)], host, int(port or 80), tally, stop))
             for i in range(clients)]
    deadline = time.monotonic() + ramp_s
    while tally.open_now < clients and time.monotonic() < deadline:  # all connected before probing starts
        await asyncio.sleep(0.02)
    probe = asyncio.create_task(_probe(host, int(port or 80), interval_s, tally, stop))
    await asyncio.sleep(duration_s)
    stop.set()
    await asyncio.gather(probe, *tasks, return_exceptions=True)
    ms = [s * 1000 for s in tally.latencies_s]
    return {
        "url": url, "clients": clients, "duration_s": duration_s,
        "held": int(statistics.median(tally.held)) if tally.held else 0, "held_min": min(tally.held, default=0),
        "probes": len(ms), "probe_failures": tally.probe_failures,
        "health_ms": {"p50": percentile(ms, 50), "p99": percentile(ms, 99), "max": max(ms, default=math.nan)},
        "opened": tally.opened, "closed_by_deadline": tally.closed_by_deadline, "refused": tally.refused,
    }


def measure(url: str, clients: int = 300, duration_s: float = 20.0, *, interval_s: float = 0.05,
            ramp_s: float = 10.0) -> dict[str, Any]:
    """Hold ``clients`` slow connections to the server at ``url`` for ``duration_s`` while probing /health/live.

    Returns ``held`` (median open slow connections at the probes), ``health_ms`` p50/p99/max, ``probes``,
    ``probe_failures``, ``closed_by_deadline``, ``refused`` and ``opened``. Not for a running event loop.
    """
    return asyncio.run(_measure(url, clients, duration_s, interval_s, ramp_s))


def summary(report: dict[str, Any]) -> str:
    h = report["health_ms"]
    return (f"slow clients {report['held']} held, health p50 {h['p50']:.1f} ms p99 {h['p99']:.1f} ms max "
            f"{h['max']:.1f} ms, closed by deadline {report['closed_by_deadline']}, refused {report['refused']}"
            + (f", {report['probe_failures']} probes failed" if report["probe_failures"] else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server (default: start a demo server on the CPU)")
    parser.add_argument("--clients", type=int, default=300, help="slow connections held (default 300)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of probing (default 20)")
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between probes (default 0.05)")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting for the server this script starts, e.g. ANYDOOR_HEADER_TIMEOUT_S=2")
    parser.add_argument("--json", action="store_true", help="print the report as JSON, then the line")
    args = parser.parse_args(argv)

    if args.url:
        report = measure(args.url, args.clients, args.duration, interval_s=args.interval)
    else:
        if str(REPO) not in sys.path:
            sys.path.insert(0, str(REPO))  # run as `python benchmarks/slow_clients.py` from a checkout
        from tests.support.server import ServerProcess

        # Room for all the slow clients (and the probes) by default, so that N are held: the question is what
        # they cost the server. Lower ANYDOOR_MAX_CONNECTIONS to measure a server full past its cap.
        env = {"ANYDOOR_DEMO": "1", "ANYDOOR_DEVICE": "cpu", "ANYDOOR_WARMUP_STEPS": "1", "OMP_WAIT_POLICY": "PASSIVE",
               "ANYDOOR_MAX_CONNECTIONS": str(max(256, args.clients + 16)),
               **dict(item.split("=", 1) for item in args.server_env)}
        with ServerProcess(env) as server:
            server.start()
            report = measure(server.url, args.clients, args.duration, interval_s=args.interval)
    if args.json:
        print(json.dumps(report, indent=2))
    print(summary(report))
    return 1 if report["health_ms"]["max"] > 1000 or report["probe_failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
