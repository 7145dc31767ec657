"""Lines per minute of ``anydoor batch`` with the local engine and with the Ray engine (``--engine ray``), on the
same manifest and machine, each run as the real command in its own process.

    python benchmarks/scale_throughput.py                          # demo model on the CPU, 12 lines, 4 steps
    python benchmarks/scale_throughput.py --lines 64 --steps 20 --ray-actors 2 --ray-cpus 8

Each configuration writes into a fresh directory; the wall time is the whole command (model load, and for Ray the
start of a local Ray and of its actors, included), and the command's own rate (images over the time after the
model loaded) is reported beside it. Every run's image bytes are compared with the first run of the same batching
and thread count. It prints one line per configuration and writes ``--json``
(default ``benchmarks/results/cpu-scale_throughput.json``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CASE_A = REPO / "tests" / "fixtures" / "reference" / "case_a"


def manifest(folder: Path, lines: int, steps: int) -> Path:
    path = folder / "manifest.jsonl"
    rows = []
    for i in range(lines):
        x, y = 40 + 37 * (i % 12), 40 + 29 * (i % 9)
        rows.append({"id": f"line-{i:04d}", "reference": str(CASE_A / "reference.png"),
                     "background": str(CASE_A / "background.png"), "box": [[x, y, 160, 140]], "seed": i,
                     "steps": steps, "guidance_scale": 1.0})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def run(name: str, manifest_path: Path, out: Path, flags: list[str], env: dict[str, str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "service.cli", "batch", str(manifest_path), "-o", str(out), "--demo", "--device",
           "cpu", "--allow-paths-outside", "--quiet", *flags]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = next(line for line in proc.stdout.splitlines() if line.startswith("batch:"))
    ok = int(re.search(r"(\d+) ok", summary).group(1))  # type: ignore[union-attr]
    own = float(re.search(r"([\d.]+) images/s", summary).group(1))  # type: ignore[union-attr]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted((out / "images").iterdir()))).hexdigest()
    return {"name": name, "flags": flags, "lines": ok, "wall_s": round(wall, 2),
            "lines_per_min": round(60 * ok / wall, 2), "command_images_per_s": own,
            "command_lines_per_min": round(60 * own, 2), "summary": summary, "images_sha256": digest,
            "loadavg_1m_before": round(load, 2), "loadavg_1m_after": round(os.getloadavg()[0], 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=12)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--ray-actors", type=int, default=1)
    parser.add_argument("--ray-cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "cpu-scale_throughput.json")
    args = parser.parse_args(argv)

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_WAIT_POLICY": "PASSIVE", "RAY_USAGE_STATS_ENABLED": "0"}
    ray = ["--engine", "ray", "--ray-actors", str(args.ray_actors), "--ray-cpus", str(args.ray_cpus),
           "--ray-cpus-per-actor", "1"]
    configs = [
        ("local --batch 4", ["--batch", "4"], {}),
        ("local --batch 1, 1 thread", ["--batch", "1"], {"OMP_NUM_THREADS": "1"}),
        (f"ray {args.ray_actors} actor(s) x 1 CPU, --batch 1", [*ray, "--batch", "1"], {}),
        ("local --batch 1", ["--batch", "1"], {}),
    ]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = manifest(folder, args.lines, args.steps)
        for index, (name, flags, extra) in enumerate(configs):
            result = run(name, path, folder / f"out{index}", flags, {**env, **extra})
            results.append(result)
            print(f"scale_throughput: {name:<36} {result['lines_per_min']:7.2f} lines/min end to end "
                  f"({result['lines']} lines in {result['wall_s']:.1f} s; {result['command_lines_per_min']:.2f} "
                  f"lines/min after loading; load {result['loadavg_1m_before']:.1f}->"
                  f"{result['loadavg_1m_after']:.1f}) images {result['images_sha256'][:12]}", flush=True)
    same = results[1]["images_sha256"] == results[2]["images_sha256"]
    print(f"scale_throughput: ray images == local images at --batch 1 with 1 thread: {same}")
    import torch

    payload = {"benchmark": "scale_throughput", "lines": args.lines, "steps": args.steps, "guidance_scale": 1.0,
               "model": "demo (tiny random)", "results": results, "ray_bytes_equal_local_1_thread": same,
               "environment": {"torch": torch.__version__, "python": sys.version.split()[0],
                               "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
