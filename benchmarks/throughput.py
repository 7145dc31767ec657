"""Throughput of the HTTP service under a closed-loop load, with and without dynamic batching.

    python benchmarks/throughput.py                                  # tiny reference model on the CPU
    python benchmarks/throughput.py --weights W.safetensors --device cuda --steps 50 --clients 8 --requests 64

For each ``--max-batch`` value (default: 1, i.e. batching off, and 4) it starts a fresh server
(``python -m service`` on 127.0.0.1, as in production), lets N clients each send their next request as soon as
the previous one is answered, and prints one table: images per second, client latency p50/p95, server queue wait
p50 and the batching gain over the first row. ``--json PATH`` writes the same figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from load import CASE_A, run_load, summarize  # noqa: E402  (benchmarks/ is this script's own directory)

from tests.support.server import ServerProcess, tiny_model_env  # noqa: E402


def measure(env: dict[str, str], *, clients: int, requests: int, steps: int) -> dict[str, Any]:
    files = {name: (f"{name}.png", (CASE_A / f"{name}.png").read_bytes(), "image/png")
             for name in ("reference", "background", "background_mask")}
    with ServerProcess(env).start(timeout=900) as server:
        # One request first so that lazy initialisation does not land in the measurement.
        asyncio.run(run_load(server.url, clients=1, requests=1, files=files, data={"steps": str(steps)},
                             headers={}, timeout_s=900))
        outcomes, wall = asyncio.run(run_load(server.url, clients=clients, requests=requests, files=files,
                                              data={"steps": str(steps)}, headers={}, timeout_s=900))
    return summarize(outcomes, wall, url=server.url, clients=clients, requests=requests, steps=steps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", help="weights file (default: the tiny reference model of the test fixtures)")
    parser.add_argument("--config", help="model config for --weights")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--max-batch", type=int, action="append", help="repeatable (default: 1 and 4)")
    parser.add_argument("--delay-ms", type=float, default=5.0, help="ANYDOOR_MAX_BATCH_DELAY_MS")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    base = tiny_model_env()
    if args.weights:
        base["ANYDOOR_WEIGHTS"] = args.weights
        base.pop("ANYDOOR_CONFIG")
        if args.config:
            base["ANYDOOR_CONFIG"] = args.config
    base.update({"ANYDOOR_DEVICE": args.device, "ANYDOOR_DTYPE": args.dtype,
                 "ANYDOOR_MAX_QUEUE": str(max(args.clients, 1)), "ANYDOOR_QUEUE_TIMEOUT_S": "3600",
                 "ANYDOOR_MAX_BATCH_DELAY_MS": str(args.delay_ms), "ANYDOOR_LOG_LEVEL": "warning"})

    rows = []
    for max_batch in args.max_batch or [1, 4]:
        report = measure({**base, "ANYDOOR_MAX_BATCH": str(max_batch)}, clients=args.clients,
                         requests=args.requests, steps=args.steps)
        if report["status_counts"] != {"200": args.requests}:
            print(f"max_batch={max_batch}: not every request succeeded: {report['status_counts']} "
                  f"{report['errors']}", file=sys.stderr)
            return 1
        rows.append({"max_batch": max_batch, **report})

    print(f"AnyDoor Serve throughput: {args.clients} closed-loop clients, {args.requests} requests, "
          f"{args.steps} steps, model {'tiny reference' if not args.weights else Path(args.weights).name}, "
          f"device {args.device}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
          f", {os.cpu_count()} CPUs")
    print(f"{'max_batch':>9} | {'images/s':>8} | {'gain':>5} | {'p50 s':>7} | {'p95 s':>7} | {'queue p50 s':>11}")
    for row in rows:
        gain = row["throughput_rps"] / rows[0]["throughput_rps"]
        print(f"{row['max_batch']:>9} | {row['throughput_rps']:>8.3f} | {gain:>5.2f} | {row['latency_s']['p50']:>7.2f}"
              f" | {row['latency_s']['p95']:>7.2f} | {row['queue_wait_s']['p50']:>11.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
