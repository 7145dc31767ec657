"""``anydoor generate``: one image from the command line, with a progress bar and the timings at the end."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from .errors import CheckpointError, InputError
from .pipeline import (
    DEFAULT_CONTROL_STRENGTH,
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_STEPS,
    PARAM_LIMITS,
    SAMPLERS,
    STAGES,
    AnyDoorPipeline,
)
from .preprocess import DEFAULT_CROP_EXPAND_RATIO, DEFAULT_REFERENCE_EXPAND_RATIO, DEFAULT_TARGET_BOX_EXPAND_RATIO
from .regions import parse_box


def _box(text: str) -> tuple[int, int, int, int]:
    try:
        return parse_box(text)
    except InputError as exc:
        raise argparse.ArgumentTypeError(exc.message) from exc


def _limits(name: str) -> str:
    lo, hi = PARAM_LIMITS[name]
    return f"{lo:g}..{hi:g}"


def register(sub: Any) -> None:
    p = sub.add_parser(
        "generate",
        help="insert an object into a background and write a PNG",
        description="Insert the object of --reference into every target region of --background (a mask with one "
        "or more separate regions, or one or more --box) and write the result, the background's size, to -o.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", help="weights file (.safetensors, or the released .ckpt)")
    src.add_argument("--demo", action="store_true", help="use a tiny random DEMO model (output is noise)")
    p.add_argument("--config", help="model config: upstream YAML or preset name (default: the released model)")
    p.add_argument("--reference", required=True, type=Path, help="object image; RGBA alpha is the mask")
    p.add_argument("--reference-mask", type=Path, help="object mask, when the reference has no alpha")
    p.add_argument("--background", required=True, type=Path, help="background image (any size)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--mask", type=Path, help="target region mask (>128 inside); each separate region is filled")
    target.add_argument("--box", type=_box, action="append", metavar="X,Y,W,H", help="target box; repeatable")
    p.add_argument("-o", "--output", required=True, type=Path, help="output PNG path")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"denoising steps ({_limits('steps')})")
    p.add_argument("--guidance-scale", type=float, default=DEFAULT_GUIDANCE_SCALE,
                   help=f"classifier-free guidance ({_limits('guidance_scale')}; 1 = off)")
    p.add_argument("--control-strength", type=float, default=DEFAULT_CONTROL_STRENGTH,
                   help=f"ControlNet residual scale ({_limits('control_strength')})")
    p.add_argument("--shape-control", action="store_true", help="follow the drawn mask's shape, not its box")
    p.add_argument("--seed", type=int, help="random seed (default: random; printed)")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddim",
                   help="ddim (upstream's) or dpmpp_2m (DPM-Solver++(2M), about 20 steps suffice)")
    p.add_argument("--reference-expand-ratio", type=float, default=DEFAULT_REFERENCE_EXPAND_RATIO)
    p.add_argument("--target-box-expand-ratio", type=float, default=DEFAULT_TARGET_BOX_EXPAND_RATIO)
    p.add_argument("--crop-expand-ratio", type=float, default=DEFAULT_CROP_EXPAND_RATIO)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp16", "bf16", "fp32"],
                   help="compute dtype (auto: fp16 on CUDA, fp32 on the CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


class _ProgressBar:
    """A redrawn bar on a terminal; on a pipe or log, a line every tenth of the way."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.start = time.perf_counter()

    def __call__(self, step: int, total: int, t: int) -> None:
        if not self.enabled:
            return
        rate = step / max(time.perf_counter() - self.start, 1e-9)
        if self.tty:
            done = 30 * step // total
            sys.stderr.write(f"\rsampling [{'#' * done}{'.' * (30 - done)}] {step}/{total} t={t:<4d} {rate:.2f} it/s")
            sys.stderr.write("\n" if step == total else "")
        elif step == total or step % max(1, total // 10) == 0:
            sys.stderr.write(f"sampling {step}/{total} ({100 * step // total}%) {rate:.2f} it/s\n")
        sys.stderr.flush()


def run(args: argparse.Namespace) -> int:
    try:
        if args.demo:
            pipe = AnyDoorPipeline.demo(device=args.device)
            print("DEMO MODEL: tiny random weights; the output is noise, not AnyDoor.", file=sys.stderr)
        else:
            pipe = AnyDoorPipeline.from_pretrained(args.weights, config=args.config, device=args.device,
                                                   dtype=args.dtype)
        result = pipe(
            args.reference,
            args.background,
            background_mask=args.mask,
            boxes=args.box,
            reference_mask=args.reference_mask,
            steps=args.steps,
            guidance_scale=args.guidance_scale,
            control_strength=args.control_strength,
            shape_control=args.shape_control,
            seed=args.seed,
            sampler=args.sampler,
            reference_expand_ratio=args.reference_expand_ratio,
            target_box_expand_ratio=args.target_box_expand_ratio,
            crop_expand_ratio=args.crop_expand_ratio,
            progress=_ProgressBar(not args.quiet),
        )
    except InputError as exc:
        print(f"error: {exc.field}: {exc.message} [{exc.code}]", file=sys.stderr)
        return 2
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(result.to_png())
    print(f"wrote {args.output} ({result.image.width}x{result.image.height}, {result.regions} region(s), "
          f"seed {result.seed})")
    print("timings: " + ", ".join(f"{k} {result.timings[k]:.3f}s" for k in STAGES if k in result.timings))
    return 0
