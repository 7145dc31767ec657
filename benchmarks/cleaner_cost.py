"""What the cleaner-insertion options cost: seconds per image with each of them, side by side in one run.

    python benchmarks/cleaner_cost.py [--steps 10] [--repeats 2] [--json benchmarks/results/cpu-cleaner_cost.json]

Tiny reference model on the CPU (or ``--preset released`` with random weights on a GPU); one 640x480 request,
one region, guidance on. Reports the median wall time of each variant and its ratio to the plain run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model.pipeline import AnyDoorPipeline  # noqa: E402

CASE_A = REPO / "tests" / "fixtures" / "reference" / "case_a"
VARIANTS = {
    "plain": {},
    "feather=8": {"feather": 8},
    "keep_background": {"keep_background": True},
    "harmonize=0.2": {"harmonize": 0.2},
    "all (keep, feather 8, harmonize 0.2)": {"keep_background": True, "feather": 8, "harmonize": 0.2},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    pipe = AnyDoorPipeline.from_pretrained(CASE_A / "model.safetensors", CASE_A / "model.yaml", device=args.device)
    common = dict(background_mask=CASE_A / "background_mask.png", steps=args.steps, seed=1)
    pipe(CASE_A / "reference.png", CASE_A / "background.png", **common)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):  # interleaved, so load on a shared machine hits every variant alike
        for name, extra in VARIANTS.items():
            t0 = time.perf_counter()
            pipe(CASE_A / "reference.png", CASE_A / "background.png", **common, **extra)  # type: ignore[arg-type]
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["plain"])
    rows = {name: {"median_s": round(statistics.median(t), 3), "ratio": round(statistics.median(t) / base, 3)}
            for name, t in times.items()}
    print(f"cleaner options, tiny model, {args.steps} steps, {args.device}, torch {torch.__version__}:")
    for name, row in rows.items():
        print(f"  {name:40s} {row['median_s']:7.3f} s  x{row['ratio']:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"machine": platform.platform(), "steps": args.steps, "device": args.device,
                                         "repeats": args.repeats, "results": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
