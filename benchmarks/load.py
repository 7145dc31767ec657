"""Load test for a running AnyDoor Serve: N concurrent clients send M /predict requests in total.

    python benchmarks/load.py --url http://127.0.0.1:8000 --clients 32 --requests 64 --steps 2

Reports how every request ended (by HTTP status), whether any was lost (no answer at all, or a duplicate
request id), client-side latency percentiles, and the server's own queue wait and stage timings read from each
response's ``Server-Timing`` header. ``--json`` prints the report as JSON. Exit status 0 if every request got a
200, else 1. Defaults send the test fixtures' case A (RGBA reference, background, mask).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

CASE_A = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "reference" / "case_a"


@dataclass
class Outcome:
    index: int
    status: int  # 0: no HTTP answer (connection error, client timeout)
    latency_s: float
    request_id: str = ""
    error: str = ""
    timings_ms: dict[str, float] = field(default_factory=dict)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def parse_server_timing(header: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in header.split(","):
        name, _, rest = item.strip().partition(";")
        if "dur=" in rest:
            out[name] = float(rest.split("dur=")[1].split(";")[0])
    return out


async def run_load(
    url: str, *, clients: int, requests: int, files: dict[str, tuple[str, bytes, str]], data: dict[str, Any],
    headers: dict[str, str], timeout_s: float,
) -> tuple[list[Outcome], float]:
    next_index = 0
    outcomes: list[Outcome] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal next_index
        while next_index < requests:
            index = next_index
            next_index += 1
            start = time.perf_counter()
            try:
                response = await client.post("/predict", files=files, data=data,
                                             headers={**headers, "X-Request-ID": f"load-{index}"})
            except httpx.HTTPError as exc:
                outcomes.append(Outcome(index, 0, time.perf_counter() - start, error=f"{type(exc).__name__}: {exc}"))
                continue
            outcome = Outcome(index, response.status_code, time.perf_counter() - start,
                              request_id=response.headers.get("x-request-id", ""),
                              timings_ms=parse_server_timing(response.headers.get("server-timing", "")))
            if response.status_code != 200:
                try:
                    outcome.error = str(response.json().get("error"))
                except ValueError:
                    outcome.error = response.text[:200]
            outcomes.append(outcome)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
    return sorted(outcomes, key=lambda o: o.index), time.perf_counter() - start


def summarize(outcomes: list[Outcome], wall_s: float, *, url: str, clients: int, requests: int,
              steps: int) -> dict[str, Any]:
    ok = [o for o in outcomes if o.status == 200]
    answered_ids = [o.request_id for o in outcomes if o.status]

    def stats(values: list[float]) -> dict[str, float]:
        return {"p50": percentile(values, 50), "p95": percentile(values, 95), "p99": percentile(values, 99),
                "max": max(values) if values else math.nan}

    def server(name: str) -> dict[str, float]:
        return stats([o.timings_ms[name] / 1000 for o in ok if name in o.timings_ms])

    return {
        "url": url,
        "clients": clients,
        "requests": requests,
        "steps": steps,
        "answered": len(answered_ids),
        # Lost: no answer at all, or an answer that belongs to another request (its id echoed wrongly).
        "lost": requests - len(answered_ids) + sum(o.request_id != f"load-{o.index}" for o in outcomes if o.status),
        "status_counts": {str(k): v for k, v in sorted(Counter(o.status for o in outcomes).items())},
        "errors": dict(Counter(o.error for o in outcomes if o.error)),
        "wall_s": wall_s,
        "throughput_rps": len(ok) / wall_s if wall_s > 0 else math.nan,
        "latency_s": stats([o.latency_s for o in ok]),
        "queue_wait_s": server("queue"),
        "sample_s": server("sample"),
        "server_total_s": server("total"),
    }


def render(report: dict[str, Any]) -> str:
    def row(name: str, s: dict[str, float]) -> str:
        return (f"  {name:<22} p50 {s['p50']:7.3f} s   p95 {s['p95']:7.3f} s   p99 {s['p99']:7.3f} s   "
                f"max {s['max']:7.3f} s")

    statuses = ", ".join(f"{k}: {v}" for k, v in report["status_counts"].items())
    lines = [
        f"AnyDoor Serve load test: {report['requests']} requests from {report['clients']} clients, "
        f"steps={report['steps']} -> {report['url']}",
        f"  answered {report['answered']}/{report['requests']}, lost {report['lost']}; status {statuses}",
        f"  wall {report['wall_s']:.1f} s, throughput {report['throughput_rps']:.2f} images/s",
        row("latency (client)", report["latency_s"]),
        row("queue wait (server)", report["queue_wait_s"]),
        row("sampling (server)", report["sample_s"]),
        row("total (server)", report["server_total_s"]),
    ]
    if report["errors"]:
        lines.append(f"  errors: {report['errors']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="base URL of the service, e.g. http://127.0.0.1:8000")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument("--requests", type=int, default=64, help="requests in total (default 64)")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps per request (default 2)")
    parser.add_argument("--guidance-scale", type=float, default=None, help="default: the service's")
    parser.add_argument("--seed", type=int, default=None, help="default: a random seed per request")
    parser.add_argument("--reference", type=Path, default=CASE_A / "reference.png")
    parser.add_argument("--background", type=Path, default=CASE_A / "background.png")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--background-mask", type=Path, default=None, help="default: the fixture's mask")
    target.add_argument("--box", action="append", default=None, help="x,y,w,h (repeatable) instead of a mask")
    parser.add_argument("--api-key", default=os.environ.get("ANYDOOR_API_KEY"),
                        help="Bearer key (default: $ANYDOOR_API_KEY)")
    parser.add_argument("--timeout", type=float, default=600.0, help="per-request client timeout, seconds")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)

    files = {"reference": (args.reference.name, args.reference.read_bytes(), "application/octet-stream"),
             "background": (args.background.name, args.background.read_bytes(), "application/octet-stream")}
    data: dict[str, Any] = {"steps": str(args.steps)}
    if args.box:
        data["box"] = args.box
    else:
        mask = args.background_mask or CASE_A / "background_mask.png"
        files["background_mask"] = (mask.name, mask.read_bytes(), "application/octet-stream")
    if args.guidance_scale is not None:
        data["guidance_scale"] = str(args.guidance_scale)
    if args.seed is not None:
        data["seed"] = str(args.seed)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    outcomes, wall = asyncio.run(run_load(args.url, clients=args.clients, requests=args.requests, files=files,
                                          data=data, headers=headers, timeout_s=args.timeout))
    report = summarize(outcomes, wall, url=args.url, clients=args.clients, requests=args.requests, steps=args.steps)
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0 if report["status_counts"] == {"200": args.requests} and report["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
