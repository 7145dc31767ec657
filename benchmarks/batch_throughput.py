"""Images per second of ``anydoor batch`` in local mode (``--batch N``) against a loop of single ``pipe.generate``
calls: the same pipeline, the same machine, the same run, interleaved.

    python benchmarks/batch_throughput.py                       # tiny reference model on the CPU, 8 images, 4 steps
    python benchmarks/batch_throughput.py --device cuda --weights W.safetensors --steps 50 --images 32

Both sides do the same work per image: generate it (one region: case_a's reference, background and mask, a seed
each) and write it as a PNG. The loop calls ``pipe.generate`` once per image; the batch side runs the real command
(``anydoor_batch.cli.run``) on a manifest of the same requests, which prepares each line and runs ``--batch`` jobs
per ``pipe.run``, and also writes results.jsonl and the COCO/YOLO annotations. The model loads once, before
either, and warms up with one generation. Repeats alternate loop, batch, loop, ... so that a change of machine
load hits both; the median of each is reported. It prints one line and writes ``--json``
(default ``benchmarks/results/<device>-batch_throughput.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import REPO, environment, median, write_json  # also puts the repo on sys.path

from anydoor_batch import cli as batch_command
from model.pipeline import AnyDoorPipeline, GenerationInputs, GenerationParams
from service.cli import build_parser

CASE_A = REPO / "tests" / "fixtures" / "reference" / "case_a"


def loop(pipe: AnyDoorPipeline, params: GenerationParams, images: int, folder: Path) -> float:
    """Seconds for ``images`` single generate calls, each PNG written."""
    inputs = GenerationInputs(CASE_A / "reference.png", CASE_A / "background.png",
                              background_mask=CASE_A / "background_mask.png")
    start = time.perf_counter()
    for seed in range(images):
        result = pipe.generate(inputs, params.with_seed(seed))
        (folder / f"{seed}.png").write_bytes(result.to_png())
    return time.perf_counter() - start


def batch(pipe: AnyDoorPipeline, params: GenerationParams, images: int, folder: Path, size: int) -> float:
    """Seconds for ``anydoor batch --batch size`` over a manifest of the same ``images`` requests."""
    manifest = folder / "manifest.jsonl"
    given = {k: v for k, v in vars(params).items() if k != "seed"}
    manifest.write_text("".join(json.dumps({
        "reference": str(CASE_A / "reference.png"), "background": str(CASE_A / "background.png"),
        "background_mask": str(CASE_A / "background_mask.png"), "seed": seed, **given}) + "\n"
        for seed in range(images)))
    args = build_parser().parse_args(["batch", str(manifest), "-o", str(folder / "out"), "--demo", "--batch",
                                      str(size), "--quiet"])
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the command's summary line; ours is printed below
        code = batch_command.run(args, pipeline=pipe)
    seconds = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"anydoor batch failed ({code}): {(folder / 'out' / 'results.jsonl').read_text()}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default=str(CASE_A / "model.safetensors"),
                        help="weights file (default: the tiny reference model of the test fixtures)")
    parser.add_argument("--config", help="model config for --weights (default: the tiny model's, else released)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4, help="jobs per pipe.run in batch mode")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, help="default: benchmarks/results/<device>-batch_throughput.json")
    args = parser.parse_args(argv)

    tiny = Path(args.weights) == CASE_A / "model.safetensors"
    config = args.config or (str(CASE_A / "model.yaml") if tiny else None)
    pipe = AnyDoorPipeline.from_pretrained(args.weights, config=config, device=args.device, dtype=args.dtype)
    params = GenerationParams(steps=args.steps)
    pipe.generate(GenerationInputs(CASE_A / "reference.png", CASE_A / "background.png",
                                   background_mask=CASE_A / "background_mask.png"), params.with_seed(0))  # warm-up
    runs: dict[str, list[float]] = {"loop": [], "batch": []}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            runs["loop"].append(loop(pipe, params, args.images, Path(tmp)))
        with tempfile.TemporaryDirectory() as tmp:
            runs["batch"].append(batch(pipe, params, args.images, Path(tmp), args.batch))
    rate = {mode: args.images / median(seconds) for mode, seconds in runs.items()}
    gain = rate["batch"] / rate["loop"]
    device = pipe.device
    model = "tiny reference model" if tiny else Path(args.weights).name
    print(f"batch_throughput: loop of generate {rate['loop']:.3f} images/s, anydoor batch --batch {args.batch} "
          f"{rate['batch']:.3f} images/s, gain {gain:.2f}x ({args.images} images x {args.repeats}, {args.steps} "
          f"steps, {model}, {device}, {torch.get_num_threads()} threads)")
    payload: dict[str, Any] = {
        "benchmark": "batch_throughput", "images": args.images, "steps": args.steps, "batch": args.batch,
        "repeats": args.repeats, "model": model, "images_per_s": rate, "gain": gain,
        "seconds": runs, "environment": environment(device),
    }
    kind = "cpu" if device.type == "cpu" else "gpu"
    write_json(args.json or REPO / "benchmarks" / "results" / f"{kind}-batch_throughput.json", payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
