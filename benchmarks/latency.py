"""End-to-end pipeline latency per stage, and peak memory, at batch 1 and batch 4.

One generation is a 512x512 background with one target region and an RGBA reference, given as PNG bytes the way
uploads arrive, with guidance on (both branches in one forward). Batch 4 is four such requests prepared one after
another and run together through ``AnyDoorPipeline.run``, as the service's batcher does. Stage times are the
pipeline's own (``preprocess`` and ``postprocess`` summed over the requests of a batch, ``encode``, ``sample`` and
``decode`` shared by them); ``total`` is the wall time from the first request's decoding to the last image.

Each (dtype, batch) runs in a fresh child process, so that its peak memory is its own: CUDA's
``max_memory_allocated`` after the weights were built, or the CPU's peak resident set (``ru_maxrss``, weights
included). Weights: a checkpoint (``--weights`` and ``--config``) or random weights of a preset, built directly on
the device in the compute dtype (the VAE stays float32, as the loader keeps it).

    python benchmarks/latency.py --preset tiny --steps 10                        # CPU, fp32
    python benchmarks/latency.py --preset released --device cuda                 # fp16 and fp32, batch 1 and 4
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import DTYPES, environment, format_table, median, write_json  # also puts the repo on sys.path
from PIL import Image

from model.config import PRESETS, AnyDoorConfig, load_config
from model.diffusion.samplers import SAMPLERS
from model.nn.anydoor import AnyDoorModel, resolve_device
from model.pipeline import AnyDoorPipeline, GenerationInputs, GenerationParams

STAGES = ("preprocess", "encode", "sample", "decode", "postprocess", "total")
SIZE = 512


def inputs() -> dict[str, bytes]:
    """A 512x512 background with a smooth pattern, a square target region, and a disc-shaped RGBA object."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE
    background = np.stack([160 + 60 * np.sin(6 * xx), 120 + 80 * yy, 100 + 50 * np.cos(5 * yy + 3 * xx)], axis=-1)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[176:368, 160:352] = 255
    disc = ((xx - 0.5) ** 2 + (yy - 0.5) ** 2) < 0.3**2
    reference = np.dstack([(255 * xx).astype(np.uint8), np.full((SIZE, SIZE), 90, np.uint8),
                           (255 * yy).astype(np.uint8), (255 * disc).astype(np.uint8)])

    def png(array: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        return buf.getvalue()

    return {"reference": png(reference), "background": png(background.astype(np.uint8)), "background_mask": png(mask)}


def random_model(config: AnyDoorConfig, device: torch.device, dtype: torch.dtype) -> AnyDoorModel:
    """Random weights, created on ``device`` in ``dtype`` (no float32 copy first: 2.45 B parameters for the
    released preset); then, as :meth:`AnyDoorModel.from_checkpoint` leaves it, the VAE and constants in float32."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = AnyDoorModel(config)
    finally:
        torch.set_default_dtype(previous)
    model.first_stage_model.float()
    model._materialize_nonpersistent(device)
    model.compute_dtype = dtype
    return model.eval().requires_grad_(False)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    """One (dtype, batch): build, warm up, time ``--runs`` generations. Runs in the child process."""
    device = resolve_device(args.device)
    dtype_name = args.dtype[0]
    dtype, batch = DTYPES[dtype_name], args.batch[0]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    if args.weights:
        model = AnyDoorModel.from_checkpoint(args.weights, args.config, device=device, dtype=dtype)
    else:
        model = random_model(load_config(args.preset), device, dtype)
    build_s = time.perf_counter() - t0
    if args.compile:
        model.model.diffusion_model = torch.compile(model.model.diffusion_model)  # type: ignore[assignment]
        model.control_model = torch.compile(model.control_model)  # type: ignore[assignment]
    pipe = AnyDoorPipeline(model, max_batch_items=max(8, batch))
    images = inputs()
    weights_mb = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        allocated_before = torch.cuda.memory_allocated(device)

    def generate(steps: int, seed: int) -> tuple[float, list[dict[str, float]]]:
        start = time.perf_counter()
        params = [GenerationParams(steps=steps, sampler=args.sampler, guidance_scale=args.guidance_scale,
                                   seed=seed + i) for i in range(batch)]
        jobs = [pipe.prepare(GenerationInputs(**images), p) for p in params]
        results = pipe.run(jobs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - start
        assert all(r.image.size == (SIZE, SIZE) for r in results)
        return wall, [r.timings for r in results]

    # Warm-up at the same batch: allocator, kernel selection, and with --compile the compilation itself.
    for i in range(args.warmup):
        generate(args.warmup_steps, 1000 + i)
    runs = []
    for i in range(args.runs):
        wall, timings = generate(args.steps, i * batch)
        stages = {
            "preprocess": sum(t["preprocess"] for t in timings),
            "encode": timings[0]["encode"],
            "sample": timings[0]["sample"],
            "decode": timings[0]["decode"],
            "postprocess": sum(t["postprocess"] for t in timings),
            "total": wall,
        }
        runs.append({k: 1000 * v for k, v in stages.items()})
    stages_ms = {k: median([r[k] for r in runs]) for k in STAGES}
    if device.type == "cuda":
        memory = {"peak_allocated_mb": torch.cuda.max_memory_allocated(device) / 2**20,
                  "peak_reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20,
                  "weights_allocated_mb": allocated_before / 2**20}
        peak_mb = memory["peak_allocated_mb"]
    else:
        peak_mb = peak_rss_mb()
        memory = {"peak_rss_mb": peak_mb}
    return {
        "dtype": dtype_name,
        "batch": batch,
        "steps": args.steps,
        "stages_ms": stages_ms,
        "ms_per_image": stages_ms["total"] / batch,
        "images_per_s": 1000 * batch / stages_ms["total"],
        "sample_ms_per_step": stages_ms["sample"] / args.steps,
        "peak_memory_mb": peak_mb,
        "memory": memory,
        "weights_mb": weights_mb,
        "params": sum(p.numel() for p in model.parameters()),
        "build_s": build_s,
        "runs_ms": runs,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="random weights of this preset")
    source.add_argument("--weights", default=None, help="a .safetensors or .ckpt checkpoint (with --config)")
    parser.add_argument("--config", default=None, help="config YAML or preset name for --weights")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=None,
                        help="compute dtypes (default: fp16 fp32 on CUDA, fp32 on the CPU)")
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 4], help="requests run together")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--sampler", choices=tuple(SAMPLERS), default="ddim")
    parser.add_argument("--guidance-scale", type=float, default=4.5, help="not 1: guidance on")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up generations per configuration")
    parser.add_argument("--warmup-steps", type=int, default=2, help="steps of each warm-up generation")
    parser.add_argument("--runs", type=int, default=3, help="timed generations per configuration (median)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet and the ControlNet")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the result to this JSON file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    if args.dtype is None:
        args.dtype = ["fp16", "fp32"] if device.type == "cuda" else ["fp32"]
    if device.type == "cpu" and "fp16" in args.dtype:
        parser.error("fp16 is not supported on the CPU; use fp32 or bf16")
    if args.guidance_scale == 1.0:
        parser.error("--guidance-scale 1 turns guidance off; this benchmark measures it on")

    if args.child:
        single = run_config(args)
        write_json(args.json, single)
        return single

    load_before = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    rows, configs = [], []
    for dtype in args.dtype:
        for batch in args.batch:
            print(f"[latency] {dtype} batch {batch}: {args.steps} steps x {args.runs} runs ...", file=sys.stderr,
                  flush=True)
            configs.append(_in_child(argv if argv is not None else sys.argv[1:], dtype, batch))
    for c in configs:
        s = c["stages_ms"]
        rows.append([c["dtype"], c["batch"], *(s[k] for k in STAGES), c["ms_per_image"], c["images_per_s"],
                     c["sample_ms_per_step"], c["peak_memory_mb"]])

    env = environment(device)
    env["loadavg_1m_before"] = load_before
    source_name = args.weights or f"random {args.preset} preset"
    result: dict[str, Any] = {
        "benchmark": "latency",
        "settings": {"weights": source_name, "image": f"{SIZE}x{SIZE}", "steps": args.steps, "sampler": args.sampler,
                     "guidance_scale": args.guidance_scale, "compile": args.compile, "warmup": args.warmup,
                     "warmup_steps": args.warmup_steps, "runs": args.runs},
        "environment": env,
        "configs": configs,
    }
    hw = env.get("gpu", env["cpu"])
    memory = "peak CUDA max_memory_allocated" if device.type == "cuda" else "peak RSS of the process (weights incl.)"
    print(f"latency: {source_name} ({configs[0]['params']:,} params), {SIZE}x{SIZE}, {args.steps} {args.sampler} "
          f"steps, guidance {args.guidance_scale}{', torch.compile' if args.compile else ''}; median of {args.runs} "
          f"runs after {args.warmup} warm-up; times in ms; memory: {memory}, MiB")
    print(f"torch {env['torch']}, {env['threads']} threads, {device} ({hw}), 1-min load avg {load_before} before, "
          f"{env.get('loadavg_1m', '?')} after")
    print(format_table(["dtype", "batch", *STAGES, "ms/image", "img/s", "ms/step", "peak MiB"], rows))
    write_json(args.json, result)
    return result


def _in_child(argv: list[str], dtype: str, batch: int) -> dict[str, Any]:
    """Run one configuration in a fresh interpreter (its own peak memory) and read back its JSON."""
    drop = {"--dtype", "--batch", "--json"}
    kept: list[str] = []
    skipping = False
    for arg in argv:
        if arg.startswith("--"):
            skipping = arg.split("=", 1)[0] in drop
            if skipping:
                continue
        elif skipping:
            continue
        kept.append(arg)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), *kept, "--child", "--dtype", dtype, "--batch",
               str(batch), "--json", str(out)]
        subprocess.run(cmd, check=True)
        return json.loads(out.read_text())


if __name__ == "__main__":
    main()
