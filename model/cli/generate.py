"""``anydoor generate``: one image from the command line, with a progress bar and the timings at the end.

Its flags are generated from the request spec (:mod:`model.spec`): one ``--kebab-name`` per input
field and parameter, with the spec's default, bounds and choices in the help.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from model.errors import CheckpointError, ErrorCode, InputError
from model.pipeline.loader import add_load_arguments, load_spec_of
from model.pipeline.result import timings_text
from model.progress import ProgressBar
from model.spec.codecs import Wire, decode_request
from model.spec.fields import FieldSpec
from model.spec.files import LocalFiles
from model.spec.inputs import INPUT_FIELDS, GenerationInputs
from model.spec.limits import Limits, add_limit_arguments, limits_of
from model.spec.params import GenerationParams, param_specs
from model.weights.download import DownloadError

DEVICE_HELP = "cpu, cuda, cuda:N or auto (default: CUDA when available)"


def flag(name: str) -> str:
    """The command-line flag of a spec field: ``guidance_scale`` -> ``--guidance-scale``."""
    return "--" + name.replace("_", "-")


def _parser_of(spec: FieldSpec) -> Any:
    def parse(text: str) -> Any:
        try:
            return spec.parse(text)
        except InputError as exc:
            raise argparse.ArgumentTypeError(exc.message) from exc

    parse.__name__ = spec.kind  # argparse names the type in its error messages
    return parse


_METAVARS = {"image": "PATH", "boxes": "X,Y,W,H", "placement": "JSON"}


def add_spec_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per input field and generation parameter of the spec. The inputs are kept as given (paths and
    text) and decoded by the spec's codecs (:func:`spec_values`), like every other surface's."""
    for f in INPUT_FIELDS:
        names = [flag(f.name)] + (["--mask"] if f.name == "background_mask" else [])
        p.add_argument(*names, dest=f.name, action="append" if f.many else "store", required=f.required,
                       metavar=_METAVARS[f.kind], help=f.help + (" (repeatable)" if f.many else ""))
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


def spec_items(args: argparse.Namespace) -> list[tuple[str, Any]]:
    """The request's items from the parsed flags (a repeated flag gives one item per use)."""
    items: list[tuple[str, Any]] = []
    for f in INPUT_FIELDS:
        value = getattr(args, f.name, None)
        items.extend((f.name, v) for v in (value if isinstance(value, list) else [value]) if v is not None)
    items.extend((spec.name, getattr(args, spec.name)) for spec in param_specs())
    return items


def spec_values(args: argparse.Namespace, limits: Limits | None = None
                ) -> tuple[GenerationInputs, GenerationParams]:
    """The inputs and parameters of the flags, through the spec's codecs: counts and limits checked before any
    file is read, files opened by the same rule as a manifest's (regular files, at most the upload limit)."""
    limits = limits or Limits()
    return decode_request(spec_items(args), Wire.CLI, limits=limits, open_file=LocalFiles(limits=limits))


def register(sub: Any) -> None:
    p = sub.add_parser(
        "generate",
        help="insert an object into a background and write a PNG",
        description="Insert the object of --reference into every target region of --background (a mask with one "
        "or more separate regions, or one or more --box) and write the result, the background's size, to -o.",
    )
    add_load_arguments(p, device_help=DEVICE_HELP)
    add_spec_arguments(p)
    add_limit_arguments(p)
    p.add_argument("-o", "--output", required=True, type=Path,
                   help="output image path; without --output-format its extension picks the format (.jpg/.jpeg: "
                   "jpeg, .webp: webp, anything else: png). With --num-outputs N the best candidate is written "
                   "here and the others beside it as <stem>-2, ..., <stem>-N")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run, output_format=None)  # None: from the -o extension (format_of_path)
    for action in p._actions:
        if action.dest == "output_format" and action.help:
            action.help = action.help.replace("[default: png]", "[default: from -o's extension, else png]")


def candidate_path(output: Path, rank: int) -> Path:
    """Where the ``rank``-th best candidate goes: ``-o`` itself for the best, ``<stem>-<rank><suffix>`` beside it
    for the others (``out.png``, ``out-2.png``, ...)."""
    return output if rank == 1 else output.with_name(f"{output.stem}-{rank}{output.suffix}")


def format_of_path(path: Path) -> str:
    """The output format an ``-o`` path's extension names (png for any other)."""
    return {".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}.get(path.suffix.lower(), "png")


def run(args: argparse.Namespace) -> int:
    from model.nn.anydoor import DeviceError, resolve_device, resolve_dtype
    from model.pipeline.loader import load_pipeline  # torch and the networks load only when the command runs

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
        limits = limits_of(args)
    except ValueError as exc:
        print(f"anydoor generate: error: {exc}", file=sys.stderr)
        return 2
    spec = load_spec_of(args)
    if args.output_format is None:
        args.output_format = format_of_path(args.output)
    try:
        inputs, params = spec_values(args, limits)
        if params.refine_reference_mask and not spec.mask_refine_weights:
            # Refused before the weights load (which can take a minute), with the flag that fixes it.
            raise InputError("refine_reference_mask", ErrorCode.REFINER_UNAVAILABLE,
                             f"no mask refiner is loaded ({spec.refiner_setting} gives its weights)")
        pipe = load_pipeline(spec)
        if args.demo:
            print("DEMO MODEL: tiny random weights; the output is noise, not AnyDoor.", file=sys.stderr)
        bar = ProgressBar("sampling", not args.quiet, unit="steps")
        result = pipe.generate(inputs, params, progress=bar, limits=limits)
    except InputError as exc:
        print(f"error: {exc} [{exc.code.value}]", file=sys.stderr)
        return 2
    except (CheckpointError, DownloadError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    for rank, candidate in enumerate(result.candidates or (result,), start=1):
        path = candidate_path(args.output, rank)
        path.write_bytes(candidate.encode(params.output_format, params.output_quality))
        scores = candidate.scores
        score = f", identity {scores.mean_identity:.4f}" if scores is not None and result.candidates else ""
        print(f"wrote {path} ({candidate.image.width}x{candidate.image.height}, {candidate.regions} region(s), "
              f"seed {candidate.seed}{score})")
    print("timings: " + timings_text(result.timings))
    return 0
