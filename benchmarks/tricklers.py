"""Trickling uploads against AnyDoor Serve: are normal ``/predict`` requests still admitted, and how fast?

    python benchmarks/tricklers.py                       # starts a server with the tiny test weights (CPU)
    python benchmarks/tricklers.py --tricklers 4 16 --gap 10 --json benchmarks/results/cpu-tricklers.json
    python benchmarks/tricklers.py --url http://127.0.0.1:8000

A trickler sends a ``/predict`` request head and the header of a file part, then one byte every ``--gap`` seconds
(10 by default), and opens a new connection as soon as the server closes its own. For each count of tricklers
(and first with none: the idle server) the script waits ``--settle`` seconds, then sends ``--requests`` normal
requests one after the other (the tiny case_a images, 1 step) and times each to its answer; it also reads
``/health-check`` meanwhile, and the server's count of 408 answers (``/metrics``) before and after. Prints one
line per count::

    tricklers 16: normal 3/3 admitted (200), latency p50 2.31 s max 2.40 s (idle 2.28 s, +0.12 s), health READY,
    trickler connections 64, closed 48 (408 read: 47, reset: 1), server 408s 48

A close can reach a trickler as a reset before the 408 is read (the server closes with the trickler's next byte
unread, and TCP then resets), so the server's count is the one that says each trickler was answered 408.

:func:`measure` is the same for tests (which use shorter windows). Exit status 1 if a normal request was not
answered 200 or took more than 2 s longer than on the idle server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BOUNDARY = b"trickler"
_HEAD = (b"POST /predict HTTP/1.1\r\nHost: anydoor\r\nContent-Type: multipart/form-data; boundary=" + BOUNDARY
         + b"\r\nContent-Length: 1000000\r\n\r\n--" + BOUNDARY
         + b'\r\nContent-Disposition: form-data; name="reference"; filename="r.png"\r\n\r\n')


@dataclass
class _Tally:
    opened: int = 0
    closed: int = 0
    timeouts: int = 0  # closed with a 408 answer (read before the close, even if a reset followed it)
    resets: int = 0  # closed by a reset before any answer was read


async def _trickler(host: str, port: int, gap_s: float, tally: _Tally, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        tally.opened += 1

        async def send(writer: asyncio.StreamWriter = writer) -> None:
            writer.write(_HEAD)
            await writer.drain()
            while True:
                await asyncio.sleep(gap_s)
                writer.write(b"\0")
                await writer.drain()

        answer = bytearray()

        async def read(reader: asyncio.StreamReader = reader, answer: bytearray = answer) -> None:
            # Chunk by chunk, so that an answer already received is kept when a reset follows it (the server
            # closes with our next byte unread, or we write one after its close): read() to EOF would raise.
            while chunk := await reader.read(65536):
                answer += chunk

        sender = asyncio.create_task(send())
        reading = asyncio.create_task(read())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({sender, reading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if reading.done() or sender.done():
            tally.closed += 1
            if answer.startswith(b"HTTP/1.1 408"):
                tally.timeouts += 1
            elif not answer:
                tally.resets += 1
        for task in (sender, reading, stopping):
            task.cancel()
        await asyncio.gather(sender, reading, stopping, return_exceptions=True)
        writer.close()


def _normal_files() -> dict[str, Any]:
    case = REPO / "tests" / "fixtures" / "reference" / "case_a"
    return {name: (f"{name}.png", (case / f"{name}.png").read_bytes(), "image/png")
            for name in ("reference", "background", "background_mask")}


async def _normal(client: Any) -> tuple[int, float]:
    started = time.monotonic()
    response = await client.post("/predict", files=_normal_files(), data={"steps": "1", "guidance_scale": "1"})
    return response.status_code, time.monotonic() - started


_TIMEOUTS = re.compile(rb'^anydoor_requests_failed_total\{reason="timeout"\} ([0-9.e+]+)$', re.MULTILINE)


async def _server_timeouts(client: Any) -> int | None:
    """The server's own count of requests dropped with 408 (``/metrics``), or None where it cannot be read."""
    response = await client.get("/metrics")
    found = _TIMEOUTS.search(response.content) if response.status_code == 200 else None
    return int(float(found.group(1))) if found else None


async def _phase(url: str, tricklers: int, gap_s: float, settle_s: float, requests: int) -> dict[str, Any]:
    import httpx

    host, _, port = url.removeprefix("http://").rstrip("/").partition(":")
    tally = _Tally()
    stop = asyncio.Event()
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        before = await _server_timeouts(client)
        tasks = [asyncio.create_task(_trickler(host, int(port or 80), gap_s, tally, stop))
                 for _ in range(tricklers)]
        try:
            await asyncio.sleep(settle_s)
            health = (await client.get("/health-check")).json()["status"]
            results = [await _normal(client) for _ in range(requests)]
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
        after = await _server_timeouts(client)
    latencies = [s for _, s in results]
    return {"tricklers": tricklers, "statuses": [c for c, _ in results], "latency_s": latencies,
            "p50_s": statistics.median(latencies), "max_s": max(latencies), "health": health,
            "trickler_connections": tally.opened, "closed": tally.closed, "closed_408": tally.timeouts,
            "closed_reset": tally.resets,
            "server_408": after - before if before is not None and after is not None else None}


async def _measure(url: str, counts: list[int], gap_s: float, settle_s: float, requests: int) -> dict[str, Any]:
    idle = await _phase(url, 0, gap_s, 0.0, requests)
    phases = [await _phase(url, n, gap_s, settle_s, requests) for n in counts]
    for phase in phases:
        phase["over_idle_s"] = phase["max_s"] - idle["p50_s"]
    return {"url": url, "gap_s": gap_s, "settle_s": settle_s, "idle": idle, "phases": phases}


def measure(url: str, counts: list[int], *, gap_s: float = 10.0, settle_s: float = 12.0,
            requests: int = 3) -> dict[str, Any]:
    """The normal requests' statuses and latencies with none, then each count of tricklers connected."""
    return asyncio.run(_measure(url, counts, gap_s, settle_s, requests))


def lines(report: dict[str, Any]) -> list[str]:
    idle = report["idle"]
    out = [f"idle: normal {idle['statuses'].count(200)}/{len(idle['statuses'])} (200), latency p50 "
           f"{idle['p50_s']:.2f} s max {idle['max_s']:.2f} s"]
    for p in report["phases"]:
        out.append(f"tricklers {p['tricklers']}: normal {p['statuses'].count(200)}/{len(p['statuses'])} admitted "
                   f"(200), latency p50 {p['p50_s']:.2f} s max {p['max_s']:.2f} s (idle {idle['p50_s']:.2f} s, "
                   f"{p['over_idle_s']:+.2f} s), health {p['health']}, trickler connections {p['trickler_connections']}"
                   f", closed {p['closed']} (408 read: {p['closed_408']}, reset: {p['closed_reset']}), server 408s "
                   f"{p['server_408']}")
    return out


def ok(report: dict[str, Any]) -> bool:
    return all(set(p["statuses"]) == {200} and p["over_idle_s"] <= 2.0 for p in report["phases"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server (default: start one with the tiny test weights)")
    parser.add_argument("--tricklers", type=int, nargs="+", default=[4, 16], help="counts to try (default 4 16)")
    parser.add_argument("--gap", type=float, default=10.0, help="seconds between a trickler's bytes (default 10)")
    parser.add_argument("--settle", type=float, default=12.0,
                        help="seconds the tricklers run before the normal requests (default 12)")
    parser.add_argument("--requests", type=int, default=3, help="normal requests per count (default 3)")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting for the server this script starts, e.g. ANYDOOR_BODY_RATE_WINDOW_S=2")
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    args = parser.parse_args(argv)

    if args.url:
        report = measure(args.url, args.tricklers, gap_s=args.gap, settle_s=args.settle, requests=args.requests)
    else:
        if str(REPO) not in sys.path:
            sys.path.insert(0, str(REPO))
        from tests.support.server import ServerProcess, tiny_model_env

        env = {**tiny_model_env(), "ANYDOOR_WARMUP_STEPS": "1"}
        for item in args.server_env:
            name, _, value = item.partition("=")
            env[name] = value
        with ServerProcess(env) as server:
            server.start()
            report = measure(server.url, args.tricklers, gap_s=args.gap, settle_s=args.settle,
                             requests=args.requests)
    for line in lines(report):
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if ok(report) else 1


if __name__ == "__main__":
    sys.exit(main())
