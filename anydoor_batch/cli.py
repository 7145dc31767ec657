"""``anydoor batch``: many images from a JSON Lines manifest, written as a labelled dataset; resumable.

Each manifest line is one request, keyed like ``/predict`` (``reference``, ``background``, one target, any
parameter by its spec name) with file paths relative to the manifest. The output directory gets the images
(``images/<id>.png``, or ``.jpg``/``.webp`` per its ``output_format``), one result record per finished line
(``results.jsonl``), and the inserted objects' boxes as COCO (``annotations.json``) and YOLO (``labels/<id>.txt``,
``labels/classes.txt``) annotations (:mod:`anydoor_batch.dataset`). Running the command again skips every line
whose id has an ``ok`` record and an image, and retries the rest; a line that finished is never generated again.

Engines: **local** (``--weights`` or ``--demo``, :mod:`anydoor_batch.local`), **remote** (``--url``, repeatable,
:mod:`anydoor_batch.remote`) and **ray** (``--engine ray``, :mod:`anydoor_batch.ray_engine`, the ``[ray]`` extra).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from anydoor_batch.dataset import PROG, Outputs
from anydoor_batch.local import run_local
from anydoor_batch.manifest import Shard, read_manifest
from anydoor_batch.ray_engine import INSTALL_HINT, RayOptions, RaySetupError, run_ray
from anydoor_batch.remote import RemoteOptions, run_remote
from anydoor_batch.report import Report
from client.transport import check_url
from model.errors import CheckpointError, InputError
from model.pipeline.loader import add_load_arguments, load_spec_of
from model.spec.files import LocalFiles
from model.spec.limits import add_limit_arguments, limits_of
from model.weights.download import DownloadError

DEVICE_HELP = "cpu, cuda, cuda:N or auto (default: CUDA when available)"


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _shard(text: str) -> Shard:
    try:
        return Shard.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(sub: Any) -> None:
    p = sub.add_parser(
        "batch",
        help="generate every line of a JSON Lines manifest into a labelled dataset (COCO + YOLO), resumable",
        description="Generate one image per line of MANIFEST (JSON Lines, keyed like /predict; paths relative to "
        "the manifest) into OUT: images/<id>.png (.jpg, .webp with output_format), results.jsonl, "
        "annotations.json (COCO), labels/<id>.txt (YOLO). "
        "Run it again to resume: finished lines are skipped, failed ones retried. Exit status: 0 all lines ok, "
        "1 some failed, 2 usage error.",
    )
    p.add_argument("manifest", type=Path, metavar="MANIFEST", help="the JSON Lines manifest")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUT", help="output directory")
    src = add_load_arguments(p, device_help=DEVICE_HELP)
    src.add_argument("--url", action="append", metavar="URL",
                     help="send the lines to this AnyDoor server (repeatable: spread over all of them)")
    add_limit_arguments(p)
    p.add_argument("--allow-paths-outside", action="store_true",
                   help="let manifest paths resolve outside the manifest's directory (refused by default, "
                   "symlinks included: a manifest names only files under its own directory)")
    p.add_argument("--batch", type=_positive, default=4, metavar="N",
                   help="local mode: jobs with the same steps and sampler run together, N per batch (a line's "
                   "num_outputs candidates always together) [default: 4]")
    p.add_argument("--concurrency", type=_positive, default=None, metavar="N",
                   help="remote mode: requests in flight at once [default: 2 per URL]")
    p.add_argument("--retries", type=int, default=8, metavar="N",
                   help="remote mode: retries of a line after 429/503, 5xx or a connection error [default: 8]")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S",
                   help="remote mode: seconds to wait for one answer [default: 600]")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="remote mode: sent as `Authorization: Bearer KEY` [default: $ANYDOOR_API_KEY]")
    p.add_argument("--annotations-every", type=_positive, default=20, metavar="N",
                   help="rewrite annotations.json after every N finished lines (and at the end) [default: 20]")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="with --weights/--demo: generate in this process (local), or with Ray Data (ray: CPU tasks "
                   "prepare the lines, a pool of actors generates; needs the [ray] extra) [default: local]")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="ray engine: join this Ray cluster (auto, ray://HOST:10001, HOST:PORT) instead of starting "
                   "a local Ray")
    p.add_argument("--ray-actors", type=_positive, default=1, metavar="N",
                   help="ray engine: generation actors, each loading the pipeline once [default: 1]")
    p.add_argument("--ray-gpus-per-actor", type=float, default=None, metavar="G",
                   help="ray engine: GPUs per actor [default: 1 where the cluster has GPUs and --device is not cpu, "
                   "else 0]")
    p.add_argument("--ray-cpus-per-actor", type=_positive, default=1, metavar="N",
                   help="ray engine: CPUs per actor, also its torch threads (on CPU the image bytes depend on the "
                   "thread count: a local run with OMP_NUM_THREADS=N writes the same bytes) [default: 1]")
    p.add_argument("--ray-cpus", type=_positive, default=None, metavar="N",
                   help="ray engine: CPUs of the local Ray it starts [default: all]")
    p.add_argument("--shard", type=_shard, default=None, metavar="I/N",
                   help="process only the lines whose id hashes to I modulo N (0 <= I < N): N runs with 0/N .. N-1/N "
                   "into N output directories cover the manifest once; `anydoor merge` joins them")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _usage(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


@contextlib.contextmanager
def _sigterm_exits() -> Iterator[None]:
    """SIGTERM ends the run like Ctrl-C: the annotations are written on the way out (a SIGKILL is resumed from)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(sig: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _check_urls(urls: Sequence[str]) -> str | None:
    for url in urls:
        try:
            check_url(url)
        except ValueError as exc:
            return f"--url {exc}"
    return None


def run(args: argparse.Namespace, *, pipeline: Any = None) -> int:
    """The command; ``pipeline`` (tests, benchmarks) replaces loading one from the flags in local mode."""
    started = time.monotonic()
    remote = bool(args.url)
    if remote:
        problem = _check_urls(args.url)
        if problem:
            return _usage(problem)
    elif pipeline is None:
        from model.nn.anydoor import DeviceError, resolve_device, resolve_dtype

        try:  # a device this machine lacks is a usage error, found before anything loads
            device = resolve_device(args.device)
            if not args.demo:
                resolve_dtype(args.dtype, device)
        except DeviceError as exc:
            return _usage(f"--{exc.setting} {exc.value}: {exc.reason}")
    if remote and args.engine != "local":
        return _usage(f"--engine {args.engine} generates with --weights or --demo, not with --url")
    if args.engine == "ray":
        try:
            import ray  # noqa: F401 - only to say at once that the extra is missing
        except ImportError:
            return _usage(INSTALL_HINT)
    if args.retries < 0 or not math.isfinite(args.timeout) or args.timeout <= 0:
        return _usage("--retries must be at least 0 and --timeout positive")
    try:
        limits = limits_of(args)
    except ValueError as exc:
        return _usage(str(exc))
    files = LocalFiles(args.manifest.parent.resolve(), confine=not args.allow_paths_outside, limits=limits)
    try:
        lines, bad, total = read_manifest(args.manifest, files=files, limits=limits)
    except OSError as exc:
        return _usage(f"cannot read the manifest {args.manifest}: {exc.strerror or exc}")
    every_class = [path.stem for line in lines for path in line.references]  # every shard gets the same classes
    if args.shard is not None:
        lines = [line for line in lines if args.shard.holds(line.id)]
        bad = [item for item in bad if args.shard.holds(item.id)]
        total = len(lines) + len(bad)
    try:
        outputs = Outputs(args.output, annotations_every=args.annotations_every)
    except (OSError, RuntimeError) as exc:
        return _usage(f"cannot use the output directory {args.output}: {exc}")
    with contextlib.ExitStack() as stack, _sigterm_exits():
        stack.callback(outputs.close)
        outputs.add_classes(every_class)
        outputs.manifest_lines = {line.id: line.number for line in lines}
        todo = [line for line in lines if not outputs.done(line.id)]
        bad_todo = [b for b in bad if not outputs.done(b.id)]
        skipped = total - len(todo) - len(bad_todo)
        report = Report(outputs, total, skipped, args.quiet)
        stack.callback(outputs.write_annotations)  # also on Ctrl-C / SIGTERM: what finished is annotated
        for item in bad_todo:
            report.input_error(item, item.error)
        loaded_s = 0.0
        if todo and args.engine == "ray":
            report.start_clock()
            try:
                run_ray(todo, report, load_spec_of(args),
                        RayOptions(args.ray_address, args.ray_actors, args.ray_gpus_per_actor, args.ray_cpus,
                                   args.batch, args.ray_cpus_per_actor),
                        limits)
            except RaySetupError as exc:
                return _usage(str(exc))
        elif todo and not remote:
            pipe = pipeline
            if pipe is None:
                from model.pipeline.loader import load_pipeline  # torch loads only when local mode runs

                if args.demo:
                    print("DEMO MODEL: tiny random weights; the output is noise, not AnyDoor.", file=sys.stderr)
                try:
                    pipe = load_pipeline(load_spec_of(args))
                except (CheckpointError, DownloadError, FileNotFoundError, ValueError, InputError) as exc:
                    return _usage(f"cannot load the model: {exc}")
            loaded_s = time.monotonic() - started
            report.start_clock()
            run_local(pipe, todo, report, batch=args.batch, limits=limits)
        elif todo:
            api_key = args.api_key if args.api_key is not None else os.environ.get("ANYDOOR_API_KEY")
            concurrency = args.concurrency or 2 * len(args.url)
            report.start_clock()
            run_remote(todo, report, RemoteOptions(args.url, concurrency, api_key or None, args.retries,
                                                   args.timeout, files))
        print(report.summary(loaded_s, time.monotonic() - started))
        print(f"wrote {args.output}/ (images/, results.jsonl, annotations.json, labels/)")
        return 0 if report.failed == 0 else 1
