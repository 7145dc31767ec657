"""``anydoor generate``: one image from the command line, with a progress bar and the timings at the end.

Its flags are generated from the request spec (:mod:`model.pipeline.params`): one ``--kebab-name`` per input
field and parameter, with the spec's default, bounds and choices in the help.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from model.config import DTYPE_NAMES
from model.errors import CheckpointError, InputError
from model.imaging.placement import Placement
from model.imaging.regions import parse_box
from model.pipeline.params import (
    INPUT_FIELDS,
    REPEATABLE_FILES,
    GenerationInputs,
    GenerationParams,
    ParamSpec,
    param_specs,
)
from model.pipeline.result import timings_text
from model.progress import ProgressBar

DEVICE_HELP = "cpu, cuda, cuda:N or auto (default: CUDA when available)"


def flag(name: str) -> str:
    """The command-line flag of a spec field: ``guidance_scale`` -> ``--guidance-scale``."""
    return "--" + name.replace("_", "-")


def _box(text: str) -> tuple[int, int, int, int]:
    try:
        return parse_box(text)
    except InputError as exc:
        raise argparse.ArgumentTypeError(exc.message) from exc


def _placement(text: str) -> Placement:
    try:
        return Placement.from_json(text)
    except InputError as exc:
        raise argparse.ArgumentTypeError(exc.message) from exc


def _parser_of(spec: ParamSpec) -> Any:
    def parse(text: str) -> Any:
        try:
            return spec.parse(text)
        except InputError as exc:
            raise argparse.ArgumentTypeError(exc.message) from exc

    parse.__name__ = spec.kind  # argparse names the type in its error messages
    return parse


def add_spec_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per input field and generation parameter of the spec."""
    for f in INPUT_FIELDS:
        if f.kind == "boxes":
            p.add_argument(flag(f.name), dest="box", type=_box, action="append", metavar="X,Y,W,H",
                           help=f"{f.help} (repeatable)")
        elif f.kind == "json":
            p.add_argument(flag(f.name), dest=f.name, type=_placement, metavar="JSON", help=f.help)
        elif f.name in REPEATABLE_FILES:
            p.add_argument(flag(f.name), dest=f.name, type=Path, action="append", required=f.required,
                           metavar="PATH", help=f"{f.help} (repeatable)")
        else:
            names = [flag(f.name)] + (["--mask"] if f.name == "background_mask" else [])
            p.add_argument(*names, dest=f.name, type=Path, required=f.required, metavar="PATH", help=f.help)
    for spec in param_specs():
        default = "random" if spec.default is None else spec.default
        bounds = f"; {spec.bounds_text()}" if spec.bounds_text() and not spec.choices else ""
        help_text = f"{spec.help} [default: {default}{bounds}]".replace("%", "%%")
        if spec.kind == "bool":
            p.add_argument(flag(spec.name), dest=spec.name, action=argparse.BooleanOptionalAction,
                           default=spec.default, help=help_text)
        else:
            p.add_argument(flag(spec.name), dest=spec.name, type=_parser_of(spec), default=spec.default,
                           choices=spec.choices, metavar=None if spec.choices else spec.kind.upper(),
                           help=help_text)


def spec_values(args: argparse.Namespace) -> tuple[GenerationInputs, GenerationParams]:
    params = GenerationParams(**{spec.name: getattr(args, spec.name) for spec in param_specs()})
    boxes = tuple(args.box) if args.box else None
    return GenerationInputs(args.reference, args.background, args.reference_mask, args.background_mask, boxes,
                            args.placement, args.placement_area), params


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
    add_spec_arguments(p)
    p.add_argument("-o", "--output", required=True, type=Path, help="output PNG path")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--dtype", default="auto", choices=("auto", *DTYPE_NAMES),
                   help="compute dtype (auto: fp16 on CUDA, fp32 on the CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from model.nn.anydoor import DeviceError, resolve_device, resolve_dtype
    from model.pipeline.run import AnyDoorPipeline  # torch and the networks load only when the command runs

    try:
        # Checked before anything loads: a device this machine lacks is a usage error (exit 2, like argparse's),
        # not a traceback from inside weight loading.
        device = resolve_device(args.device)
        if not args.demo:  # the demo model always computes in fp32 and ignores --dtype
            resolve_dtype(args.dtype, device)
    except DeviceError as exc:
        print(f"anydoor generate: error: --{exc.setting} {exc.value}: {exc.reason}", file=sys.stderr)
        return 2
    try:
        inputs, params = spec_values(args)
        if args.demo:
            pipe = AnyDoorPipeline.demo(device=args.device)
            print("DEMO MODEL: tiny random weights; the output is noise, not AnyDoor.", file=sys.stderr)
        else:
            pipe = AnyDoorPipeline.from_pretrained(args.weights, config=args.config, device=args.device,
                                                   dtype=args.dtype)
        bar = ProgressBar("sampling", not args.quiet, unit="steps")
        result = pipe.generate(inputs, params, progress=bar)
    except InputError as exc:
        print(f"error: {exc} [{exc.code.value}]", file=sys.stderr)
        return 2
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(result.to_png())
    print(f"wrote {args.output} ({result.image.width}x{result.image.height}, {result.regions} region(s), "
          f"seed {result.seed})")
    print("timings: " + timings_text(result.timings))
    return 0
