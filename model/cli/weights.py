"""``anydoor weights convert`` and ``anydoor weights download``.

``convert`` turns the released Lightning checkpoint (``epoch=1-step=8687.ckpt``: fp32 weights plus Adam state,
read with a restricted unpickler and memory-mapped so the optimizer state is never loaded) into a safetensors
file with the same key names, networks in fp16 and the DDPM schedule in fp32. The keys are checked against the
model config first, so a converted file always loads. ``download`` fetches weights over HTTP(S) with a progress
bar, resume and checksum (:mod:`model.weights.download`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from model.config import DTYPE_NAMES
from model.progress import ProgressBar
from model.weights.download import DownloadError, download, file_sha256

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add ``weights {convert,download}`` to the ``anydoor`` command line."""
    weights = subparsers.add_parser(
        "weights",
        help="convert or download model weights",
        description="Convert the released AnyDoor checkpoint to safetensors, or download weights with a checksum.",
    )
    sub = weights.add_subparsers(dest="weights_command", metavar="SUBCOMMAND")
    sub.required = True

    convert = sub.add_parser(
        "convert",
        help="convert a .ckpt (or .safetensors) to safetensors in fp16/bf16/fp32",
        description=(
            "Convert the released Lightning checkpoint to safetensors with the same key names. Network weights "
            "take --dtype; the DDPM schedule buffers stay fp32. The keys are checked against --config first."
        ),
    )
    convert.add_argument("src", metavar="IN", type=Path, help="the .ckpt (or .safetensors) to read")
    convert.add_argument("dst", metavar="OUT", type=Path, help="the .safetensors file to write")
    convert.add_argument("--dtype", choices=DTYPE_NAMES, default="fp16", help="default: fp16")
    convert.add_argument(
        "--config",
        default="released",
        metavar="C",
        help="model config: a preset (released, tiny) or an upstream-layout YAML; default: released",
    )
    convert.add_argument("--quiet", action="store_true", help="no progress output")
    convert.set_defaults(func=_convert)

    refiner = sub.add_parser(
        "convert-refiner",
        help="convert upstream's coarse_mask_refine.pth (the reference-mask refiner) to safetensors",
        description="Read upstream's reference-mask refiner checkpoint (a torch pickle {'state_dict': ...}, loaded "
        "safely and strictly) and write its weights, same keys, to a .safetensors file for "
        "ANYDOOR_MASK_REFINE_WEIGHTS.",
    )
    refiner.add_argument("src", metavar="IN", type=Path, help="coarse_mask_refine.pth (or a .safetensors)")
    refiner.add_argument("dst", metavar="OUT", type=Path, help="the .safetensors file to write")
    refiner.set_defaults(func=_convert_refiner)

    fetch = sub.add_parser(
        "download",
        help="download weights with progress, resume and SHA-256 check",
        description=(
            "Download URL into the cache (ANYDOOR_CACHE_DIR, default ~/.cache/anydoor, laid out as host/path) "
            "or into --dest. An interrupted transfer resumes where it stopped when run again; a file whose "
            "SHA-256 differs is deleted. Prints the path of the finished file."
        ),
    )
    fetch.add_argument("url", metavar="URL", help="http(s) URL of the weights file")
    fetch.add_argument("--sha256", required=True, metavar="HEX", help="expected SHA-256 of the file (64 hex digits)")
    fetch.add_argument("--dest", type=Path, metavar="DIR", help="directory to put the file in (default: the cache)")
    fetch.add_argument("--quiet", action="store_true", help="no progress bar")
    fetch.set_defaults(func=_download)


def _fail(command: str, message: str) -> int:
    print(f"anydoor weights {command}: error: {message}", file=sys.stderr)
    return 1


def _convert(args: argparse.Namespace) -> int:
    # Imported here: loading torch and the model code is only needed by this subcommand.
    from model.config import load_config
    from model.errors import CheckpointError
    from model.nn.anydoor import AnyDoorModel
    from model.weights.checkpoint import convert

    src, dst = args.src, args.dst
    if dst.suffix != ".safetensors":
        return _fail("convert", f"OUT must end in .safetensors (the loader picks the format by suffix), got {dst}")
    if src.resolve() == dst.resolve():
        return _fail("convert", "IN and OUT are the same file")
    if not src.is_file():
        return _fail("convert", f"checkpoint not found: {src}")
    try:
        config = load_config(args.config)
    except (FileNotFoundError, ValueError) as exc:
        return _fail("convert", f"config {args.config!r}: {exc}")
    start = time.perf_counter()
    try:
        count = convert(
            src,
            dst,
            args.dtype,
            expected=AnyDoorModel.expected_shapes(config),
            progress=ProgressBar("converting", not args.quiet, unit="tensors"),
        )
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        return _fail("convert", str(exc))
    size = dst.stat().st_size
    # The checksum is what `anydoor weights download --sha256` and ANYDOOR_WEIGHTS_SHA256 want once the file
    # is hosted somewhere; hashing now saves a second pass over several gigabytes later.
    digest = file_sha256(dst)
    print(
        f"wrote {dst}: {count} tensors, {size / 1e9:.2f} GB, {args.dtype}, "
        f"{time.perf_counter() - start:.1f} s\nsha256 {digest}",
        file=sys.stderr,
    )
    print(dst)
    return 0


def _convert_refiner(args: argparse.Namespace) -> int:
    from model.errors import CheckpointError
    from model.nn.mask_refine import convert_mask_refiner

    try:
        out = convert_mask_refiner(args.src, args.dst)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        return _fail("convert-refiner", str(exc))
    print(f"wrote {out} (sha256 {file_sha256(out)})", file=sys.stderr)
    print(out)
    return 0


def _download(args: argparse.Namespace) -> int:
    try:
        path = download(args.url, sha256=args.sha256, dest=args.dest, progress=not args.quiet)
    except (DownloadError, ValueError, OSError) as exc:
        return _fail("download", str(exc))
    print(path)
    return 0
