"""``anydoor batch``: many images from a JSON Lines manifest, written as a labelled dataset; resumable.

Each manifest line is one request, keyed like ``/predict`` (``reference``, ``background``, one target, any
parameter by its spec name) with file paths relative to the manifest. The output directory gets the images
(``images/<id>.png``), one result record per finished line (``results.jsonl``), and the inserted objects' boxes
as COCO (``annotations.json``) and YOLO (``labels/<id>.txt``, ``labels/classes.txt``) annotations.

Every output file is written so that a kill at any moment leaves it whole: images and annotation files are
written to a temporary file in the same directory, fsynced and renamed over the old one; ``results.jsonl`` is
appended a line at a time and fsynced. Running the command again skips every line whose id has an ``ok`` record
and an image, and retries the rest; a line that finished is never generated again.

Two ways to run: **local** (``--weights`` or ``--demo``) generates in this process, preparing lines one by one and
running those with the same denoising schedule (:attr:`Job.batch_key`) together, ``--batch`` jobs per
:meth:`AnyDoorPipeline.run`; **remote** (``--url``, repeatable) sends each line through :class:`client.AnyDoorClient`
(a multipart ``POST /predict`` to the least busy of the servers, ``Retry-After`` honoured, transient failures
retried with jittered backoff), from ``--concurrency`` threads.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import queue
import re
import secrets
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from client import AnyDoorClient, AnyDoorError
from client.transport import check_url
from model.errors import CheckpointError, ErrorCode, InputError
from model.pipeline.loader import add_load_arguments, load_spec_of
from model.progress import ProgressBar
from model.spec.codecs import (
    KNOWN_FIELDS,
    Wire,
    collect,
    decode_params,
    items_of_json,
    parse_json_object,
    unknown_field,
)
from model.spec.files import LocalFiles
from model.spec.inputs import Box, GenerationInputs
from model.spec.limits import Limits, add_limit_arguments, limits_of
from model.spec.params import PARAM_NAMES, GenerationParams
from model.spec.placement import Placement
from model.weights.download import DownloadError

PROG = "anydoor batch"
DEVICE_HELP = "cpu, cuda, cuda:N or auto (default: CUDA when available)"
MANIFEST_KEYS = ("id", *KNOWN_FIELDS)
SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
RESERVED_IDS = ("classes",)  # labels/classes.txt lives next to labels/<id>.txt
TMP_SUFFIX = ".anydoor-tmp"  # our temporary files: .<name>.<8 hex>.anydoor-tmp; the clean-up touches no other
TMP_NAME = re.compile(r"\..+\.[0-9a-f]{8}" + re.escape(TMP_SUFFIX))
BACKOFF_BASE_S = 0.5  # the client's backoff base; tests make it shorter


# --- the manifest ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Line:
    """One manifest line, validated: checked paths, a target, the parameters."""

    number: int  # 1-based line number in the manifest
    id: str
    references: tuple[Path, ...]
    reference_masks: tuple[Path, ...]
    background: Path
    boxes: tuple[Box, ...] | None
    background_mask: Path | None
    placement: Placement | None
    placement_area: Path | None
    params: GenerationParams
    given: tuple[str, ...]  # the parameters the line sets (sent as form fields; the rest are the defaults)

    def regions_known(self) -> int | None:
        """How many regions the line has, where that is known before decoding (boxes, placement)."""
        if self.boxes is not None:
            return len(self.boxes)
        return self.placement.count if self.placement is not None else None

    def classes(self, regions: int) -> list[str]:
        """The category of each region: the stem of its reference (one reference serves all regions)."""
        stems = [path.stem for path in self.references]
        return [stems[min(i, len(stems) - 1)] for i in range(regions)]

    def values(self) -> dict[str, Any]:
        """The line as request values (paths for files), for :func:`model.spec.codecs.encode_form`."""
        out: dict[str, Any] = {"reference": list(self.references), "reference_mask": list(self.reference_masks),
                               "background": self.background, "background_mask": self.background_mask,
                               "box": list(self.boxes) if self.boxes is not None else None,
                               "placement": self.placement, "placement_area": self.placement_area}
        out.update({name: getattr(self.params, name) for name in self.given})
        return {k: v for k, v in out.items() if v is not None and v != []}


@dataclass(frozen=True)
class BadLine:
    number: int
    id: str
    error: InputError


def _line_id(raw: Mapping[str, Any], number: int) -> str:
    if "id" not in raw:
        return str(number)
    value = raw["id"]
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        value = str(value)
    if not isinstance(value, str) or not SAFE_ID.fullmatch(value) or value.lower() in RESERVED_IDS:
        raise InputError("id", ErrorCode.INVALID_PARAMETER, "must be a file name of letters, digits, '.', '_' and "
                         f"'-' (not starting with '.' or '-', at most 128, not {RESERVED_IDS[0]!r}), got {value!r}")
    return value


def _request_values(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The line's request keys (all but ``id``). The older manifest form, a placement object with its allowed
    area under ``"area"``, is read as the flat ``placement`` + ``placement_area`` of ``/predict``."""
    values = {k: v for k, v in raw.items() if k != "id"}
    placement = values.get("placement")
    if isinstance(placement, Mapping) and "area" in placement:
        if "placement_area" in values:
            raise InputError("placement_area", ErrorCode.INVALID_PARAMETER,
                             "is given twice: as placement_area and as the placement's 'area'")
        values["placement"] = {k: v for k, v in placement.items() if k != "area"}
        values["placement_area"] = placement["area"]
    return values


def parse_line(raw: Any, number: int, base: Path, *, files: LocalFiles | None = None,
               limits: Limits | None = None) -> Line:
    """A manifest line (its parsed JSON) validated into a :class:`Line`; :class:`InputError` naming the field.

    The line goes through the request spec's codecs (:mod:`model.spec.codecs`, the JSON wire) exactly as a
    prediction's input does: the same names, box grammar, counting rules and limits as ``/predict``. Its files
    are checked by ``files`` (default: confined to ``base``), none is read here."""
    limits = limits or Limits()
    files = files or LocalFiles(base, confine=True, limits=limits)
    if not isinstance(raw, dict):
        raise InputError(None, ErrorCode.INVALID_JSON, f"a manifest line must be a JSON object, got "
                         f"{type(raw).__name__}")
    for key in raw:
        if key not in MANIFEST_KEYS:
            raise unknown_field(key, MANIFEST_KEYS, "a manifest key")
    line_id = _line_id(raw, number)
    request = collect(items_of_json(_request_values(raw)), Wire.JSON, limits)

    def paths(name: str) -> tuple[Path, ...]:
        return tuple(files.resolve(name, value) for value in request.files(name))

    def path(name: str) -> Path | None:
        found = paths(name)
        return found[0] if found else None

    references, masks, background = paths("reference"), paths("reference_mask"), path("background")
    assert background is not None  # required: collect says so otherwise
    params = decode_params(request)
    given = tuple(name for name in PARAM_NAMES if name in request.values)
    return Line(number, line_id, references, masks, background, request.boxes, path("background_mask"),
                request.placement, path("placement_area"), params, given)


def read_manifest(path: Path, *, files: LocalFiles | None = None, limits: Limits | None = None
                  ) -> tuple[list[Line], list[BadLine], int]:
    """Every line of the manifest: the valid ones, the bad ones (with the reason), and the count of lines.

    Each line stands alone: bad UTF-8, bad JSON or a key given twice is that line's error, and the rest go on."""
    base = path.parent.resolve()
    files = files or LocalFiles(base, confine=True, limits=limits)
    lines: list[Line] = []
    bad: list[BadLine] = []
    seen: dict[str, int] = {}
    total = 0
    with path.open("rb") as manifest:
        for number, data in enumerate(manifest, start=1):
            if not data.strip():
                continue  # blank lines are not lines of the dataset (a trailing newline, spacing)
            total += 1
            line_id = str(number)
            try:
                raw = parse_json_object(data, f"line {number}")
                line_id = _line_id(raw, number)
                if line_id.lower() in seen:
                    raise InputError("id", ErrorCode.INVALID_PARAMETER,
                                     f"{line_id!r} is also the id of line {seen[line_id.lower()]}")
                seen[line_id.lower()] = number
                lines.append(parse_line(raw, number, base, files=files, limits=limits))
            except InputError as exc:
                bad.append(BadLine(number, line_id if exc.field != "id" else str(number), exc))
    return lines, bad, total


# --- the output directory ---------------------------------------------------------------------------------------


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader (or a crash) sees the old file or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{TMP_SUFFIX}")
    try:
        with tmp.open("wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # the rename itself made durable (not possible on every platform)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed run-length encoding of a mask: run lengths in column-major order, 0s first."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.r_[0, edges, flat.size]).tolist()
    if flat.size and flat[0]:
        counts.insert(0, 0)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


@dataclass
class Finished:
    """What a line gave: its image and what the annotations need."""

    png: bytes
    width: int
    height: int
    seed: int
    boxes: list[Box]
    timings: dict[str, float]
    extra: dict[str, Any] = field(default_factory=dict)


class Outputs:
    """The output directory: images, labels, the results log and the annotations; one writer at a time."""

    def __init__(self, root: Path, *, annotations_every: int) -> None:
        self.root = root
        self.images = root / "images"
        self.labels = root / "labels"
        self.results_path = root / "results.jsonl"
        self.annotations_path = root / "annotations.json"
        self.classes_path = self.labels / "classes.txt"
        self.annotations_every = annotations_every
        self.manifest_lines: dict[str, int] = {}  # id -> line number: the lines the annotations cover
        self._lock = threading.Lock()
        self._since_annotations = 0
        self.images.mkdir(parents=True, exist_ok=True)
        self.labels.mkdir(parents=True, exist_ok=True)
        self._lockfile = (root / ".lock").open("a")
        try:
            import fcntl

            fcntl.flock(self._lockfile.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # not POSIX: no lock, as before
            pass
        except OSError:
            self._lockfile.close()
            raise RuntimeError(f"another `{PROG}` is writing to {root}") from None
        for folder in (self.images, self.labels, root):  # our temporary files of a run that was killed
            for stale in folder.glob(f".*{TMP_SUFFIX}"):
                if TMP_NAME.fullmatch(stale.name) and stale.is_file():
                    stale.unlink(missing_ok=True)
        self.records = self._load()
        self.classes = self._load_classes()
        self._results: IO[str] = self.results_path.open("a", encoding="utf-8")

    def _load(self) -> dict[str, dict[str, Any]]:
        """The latest record of each id in results.jsonl; a last line cut short by a kill is dropped."""
        records: dict[str, dict[str, Any]] = {}
        if not self.results_path.exists():
            return records
        data = self.results_path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            with self.results_path.open("r+b") as f:  # a partial last line would glue onto the next append
                f.truncate(end)
        for text in data[:end].decode("utf-8", errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(text)
                if isinstance(record, dict) and isinstance(record.get("id"), str):
                    records[record["id"]] = record
        return records

    def _load_classes(self) -> list[str]:
        if not self.classes_path.exists():
            return []
        return [name for name in self.classes_path.read_text(encoding="utf-8").splitlines() if name]

    def done(self, line_id: str) -> bool:
        record = self.records.get(line_id)
        return bool(record and record.get("status") == "ok" and (self.images / f"{line_id}.png").is_file())

    def add_classes(self, names: Sequence[str]) -> None:
        """Register category names; existing ones keep their index, so labels written earlier stay right."""
        new = [name for name in dict.fromkeys(names) if name not in self.classes]
        if new or not self.classes_path.exists():
            self.classes.extend(new)
            atomic_write(self.classes_path, "".join(f"{name}\n" for name in self.classes).encode("utf-8"))

    def _append(self, record: dict[str, Any]) -> None:
        self._results.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._results.flush()
        os.fsync(self._results.fileno())
        self.records[record["id"]] = record

    def ok(self, line: Line, result: Finished) -> None:
        classes = line.classes(len(result.boxes))
        labels = []
        for (x, y, w, h), name in zip(result.boxes, classes, strict=True):
            cx, cy = (x + w / 2) / result.width, (y + h / 2) / result.height
            labels.append(f"{self.classes.index(name)} {cx:.6f} {cy:.6f} {w / result.width:.6f} "
                          f"{h / result.height:.6f}\n")
        record = {"id": line.id, "line": line.number, "status": "ok", "seed": result.seed,
                  "boxes": [list(b) for b in result.boxes], "classes": classes, "file": f"images/{line.id}.png",
                  "width": result.width, "height": result.height,
                  "timings": {k: round(v, 4) for k, v in result.timings.items()}, **result.extra}
        with self._lock:
            # Image and label first: an ok record always has its files; files without a record are redone.
            atomic_write(self.images / f"{line.id}.png", result.png)
            atomic_write(self.labels / f"{line.id}.txt", "".join(labels).encode("utf-8"))
            self._append(record)
            self._tick()

    def failed(self, number: int, line_id: str, code: str, field_name: str | None, message: str,
               seed: int | None = None) -> None:
        record = {"id": line_id, "line": number, "status": "failed", "seed": seed,
                  "error": {"code": code, "field": field_name, "message": message}}
        with self._lock:
            self._append(record)
            self._tick()

    def _tick(self) -> None:
        self._since_annotations += 1
        if self._since_annotations >= self.annotations_every:
            self._write_annotations()

    def write_annotations(self) -> None:
        with self._lock:
            self._write_annotations()

    def _write_annotations(self) -> None:
        # The manifest's lines that have an ok record, numbered by their line (the COCO image id): records of ids
        # the manifest no longer has are not part of this dataset.
        numbers = self.manifest_lines
        done = sorted((numbers[i], i, r) for i, r in self.records.items() if r.get("status") == "ok" and i in numbers)
        images: list[dict[str, Any]] = []
        annotations: list[dict[str, Any]] = []
        for number, line_id, record in done:
            images.append({"id": number, "file_name": f"{line_id}.png", "width": record["width"],
                           "height": record["height"]})
            segmentations = record.get("segmentation") or [None] * len(record["boxes"])
            for box, name, seg in zip(record["boxes"], record["classes"], segmentations, strict=True):
                x, y, w, h = box
                item: dict[str, Any] = {"id": len(annotations) + 1, "image_id": number,
                                        "category_id": self.classes.index(name) + 1, "bbox": [x, y, w, h],
                                        "area": w * h, "iscrowd": 0}
                if seg is not None:
                    item["segmentation"] = seg
                    item["area"] = int(sum(seg["counts"][1::2]))
                annotations.append(item)
        coco = {"info": {"description": "AnyDoor batch output", "version": "1.0",
                         "date_created": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
                "licenses": [], "images": images, "annotations": annotations,
                "categories": [{"id": i + 1, "name": name, "supercategory": "object"}
                               for i, name in enumerate(self.classes)]}
        atomic_write(self.annotations_path, json.dumps(coco, separators=(",", ":")).encode("utf-8"))
        self._since_annotations = 0

    def close(self) -> None:
        self._results.close()
        self._lockfile.close()


def segmentations(line: Line, boxes: Sequence[Box]) -> list[dict[str, Any] | None] | None:
    """With shape control and a background mask the object follows each region's shape: the region's RLE, matched
    to its box (the pipeline splits the mask the same way); otherwise None (the box is the annotation)."""
    if line.background_mask is None or not line.params.shape_control:
        return None
    from model.imaging.decode import load_mask
    from model.imaging.regions import split_mask

    mask = load_mask(line.background_mask, field="background_mask", size=None)
    by_box: dict[Box, np.ndarray] = {}
    for region in split_mask(mask):
        ys, xs = np.nonzero(region)
        by_box[(int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1))] = region
    found = [by_box.get(box) for box in boxes]
    return [rle(region) if region is not None else None for region in found]


# --- progress and the summary -----------------------------------------------------------------------------------


class Report:
    """Counts, the progress bar and the messages about bad lines (stderr)."""

    def __init__(self, outputs: Outputs, total: int, skipped: int, quiet: bool) -> None:
        self.outputs = outputs
        self.total, self.skipped = total, skipped
        self.ok = self.failed = 0
        self.bar = ProgressBar("batch", not quiet, unit="images")
        self.lock = threading.Lock()
        self.bar.begin(skipped, total)

    def start_clock(self) -> None:
        """Count the rate and ETA from here (after the model loaded and the bad lines were reported), so they
        measure generation, not start-up or the lines refused at once."""
        self.bar.start_done, self.bar.t0 = self.skipped + self.ok + self.failed, time.monotonic()

    def _done(self) -> None:
        self.bar.update(self.skipped + self.ok + self.failed)

    def succeeded(self, line: Line, result: Finished) -> None:
        self.outputs.ok(line, result)
        with self.lock:
            self.ok += 1
            self._done()

    def line_failed(self, number: int, line_id: str, code: str, field_name: str | None, message: str,
                    seed: int | None = None) -> None:
        self.outputs.failed(number, line_id, code, field_name, message, seed)
        with self.lock:
            self.failed += 1
            where = f" {field_name}:" if field_name and not message.startswith(f"{field_name}:") else ""
            clear = "\r\x1b[K" if self.bar.tty and self.bar.enabled else ""
            self.bar.stream.write(f"{clear}line {number} (id {line_id}) failed:{where} {message} [{code}]\n")
            self._done()

    def input_error(self, line: Line | BadLine, exc: InputError, seed: int | None = None) -> None:
        self.line_failed(line.number, line.id, exc.code.value, exc.field, exc.message, seed)

    def summary(self, loaded_s: float, wall_s: float) -> str:
        self.bar.end(self.skipped + self.ok + self.failed)
        busy = max(wall_s - loaded_s, 1e-9)
        return (f"batch: {self.ok} ok, {self.failed} failed, {self.skipped} skipped (done before) of {self.total} "
                f"lines; {self.ok / busy:.3f} images/s over {busy:.1f} s, wall time {wall_s:.1f} s "
                f"(model load {loaded_s:.1f} s)")


# --- local mode --------------------------------------------------------------------------------------------------


def local_inputs(line: Line) -> GenerationInputs:
    """The images and target of one line for the in-process pipeline (it places a placement's boxes itself)."""
    return GenerationInputs(
        reference=line.references, background=line.background, reference_mask=line.reference_masks,
        background_mask=line.background_mask, boxes=line.boxes, placement=line.placement,
        placement_area=line.placement_area)


def run_local(pipe: Any, lines: Sequence[Line], report: Report, *, batch: int, limits: Limits | None = None
              ) -> None:
    """Prepare each line, and run lines with one denoising schedule together, ``batch`` jobs per pipe.run."""
    pending: dict[Any, list[tuple[Line, Any]]] = {}

    def flush(key: Any) -> None:
        group = pending.pop(key)
        try:
            results = pipe.run([job for _, job in group])
        except Exception as exc:  # one bad job must not take its batch mates down: run them one at a time
            if len(group) > 1:
                for item in group:
                    pending[key] = [item]
                    flush(key)
                return
            line, job = group[0]
            report.line_failed(line.number, line.id, ErrorCode.INTERNAL_ERROR.value, None,
                               f"{type(exc).__name__}: {exc}", job.seed)
            return
        for (line, _), result in zip(group, results, strict=True):
            try:
                extra = {}
                seg = segmentations(line, result.boxes)
                if seg is not None:
                    extra["segmentation"] = seg
                report.succeeded(line, Finished(result.to_png(), result.image.width, result.image.height,
                                                result.seed, [tuple(b) for b in result.boxes], dict(result.timings),
                                                extra))
            except InputError as exc:
                report.input_error(line, exc, result.seed)

    for line in lines:
        try:
            job = pipe.prepare(local_inputs(line), line.params, limits=limits)
        except InputError as exc:
            report.input_error(line, exc, line.params.seed)
            continue
        except Exception as exc:  # a bug or an unreadable file must cost one line, not the run
            report.line_failed(line.number, line.id, ErrorCode.INTERNAL_ERROR.value, None,
                               f"{type(exc).__name__}: {exc}", line.params.seed)
            continue
        group = pending.setdefault(job.batch_key, [])
        group.append((line, job))
        if len(group) >= batch:
            flush(job.batch_key)
        elif sum(len(g) for g in pending.values()) >= 4 * batch:  # bound the prepared jobs held in memory
            flush(max(pending, key=lambda k: len(pending[k])))
    for key in list(pending):
        flush(key)


# --- remote mode -------------------------------------------------------------------------------------------------


def form_values(line: Line, files: LocalFiles | None = None) -> dict[str, Any]:
    """The line as :meth:`client.AnyDoorClient.predict`'s keywords, its files read here as ``(name, bytes)``, by
    the same checks as when the manifest was read."""
    files = files or LocalFiles()

    def read(name: str, value: Any) -> Any:
        if isinstance(value, list):
            return [read(name, v) for v in value]
        if isinstance(value, Path):
            return value.name, files(name, value)
        return value

    return {name: read(name, value) for name, value in line.values().items()}


@dataclass
class RemoteOptions:
    urls: Sequence[str]
    concurrency: int
    api_key: str | None
    retries: int
    timeout_s: float
    files: LocalFiles | None = None


Failure = tuple[str, "str | None", str]  # (code, field, message) of a line that failed


def send_line(line: Line, anydoor: AnyDoorClient, files: LocalFiles | None = None
              ) -> tuple[Finished | None, Failure | None]:
    """One line through the client: it retries transient failures (429/503 after Retry-After, 5xx, no answer)."""
    try:
        items = anydoor.form(form_values(line, files))
    except InputError as exc:
        return None, (exc.code.value, exc.field, exc.message)
    try:
        result = anydoor.send(items)
    except AnyDoorError as exc:
        return None, (exc.error, exc.field, exc.message)
    timings = {name: ms / 1000 for name, ms in result.timings_ms.items()}
    return Finished(result.png, result.width, result.height, result.seed, list(result.boxes), timings,
                    {"server": result.server, "attempts": result.attempts}), None


def run_remote(lines: Sequence[Line], report: Report, options: RemoteOptions) -> None:
    """``concurrency`` threads send the lines; this thread writes what they bring back (one writer)."""
    anydoor = AnyDoorClient(options.urls, options.api_key, timeout=options.timeout_s, retries=options.retries,
                            backoff_base_s=BACKOFF_BASE_S)
    todo: queue.Queue[Line] = queue.Queue()
    done: queue.Queue[tuple[Line, Finished | None, Any]] = queue.Queue()
    stop = threading.Event()
    for line in lines:
        todo.put(line)

    def worker() -> None:
        while not stop.is_set():
            try:
                line = todo.get_nowait()
            except queue.Empty:
                return
            try:
                result, error = send_line(line, anydoor, options.files)
            except Exception as exc:  # a bug in one line must not strand the others
                result, error = None, (ErrorCode.INTERNAL_ERROR.value, None, f"{type(exc).__name__}: {exc}")
            done.put((line, result, error))

    # Daemon threads: on Ctrl-C the process exits without waiting for requests in flight (they are redone later).
    threads = [threading.Thread(target=worker, name=f"batch-{i}", daemon=True)
               for i in range(min(options.concurrency, max(len(lines), 1)))]
    for thread in threads:
        thread.start()
    try:
        for _ in range(len(lines)):
            line, result, error = done.get()
            if result is not None:
                try:
                    seg = segmentations(line, result.boxes)
                    if seg is not None:
                        result.extra["segmentation"] = seg
                    report.succeeded(line, result)
                except InputError as exc:
                    report.input_error(line, exc, result.seed)
            else:
                code, field_name, message = error
                report.line_failed(line.number, line.id, code, field_name, message, line.params.seed)
    finally:
        stop.set()
        anydoor.close()


# --- the command ------------------------------------------------------------------------------------------------


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def register(sub: Any) -> None:
    p = sub.add_parser(
        "batch",
        help="generate every line of a JSON Lines manifest into a labelled dataset (COCO + YOLO), resumable",
        description="Generate one image per line of MANIFEST (JSON Lines, keyed like /predict; paths relative to "
        "the manifest) into OUT: images/<id>.png, results.jsonl, annotations.json (COCO), labels/<id>.txt (YOLO). "
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
                   help="local mode: jobs with the same steps and sampler run together, N per batch [default: 4]")
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
    try:
        outputs = Outputs(args.output, annotations_every=args.annotations_every)
    except (OSError, RuntimeError) as exc:
        return _usage(f"cannot use the output directory {args.output}: {exc}")
    with contextlib.ExitStack() as stack, _sigterm_exits():
        stack.callback(outputs.close)
        outputs.add_classes([path.stem for line in lines for path in line.references])
        outputs.manifest_lines = {line.id: line.number for line in lines}
        todo = [line for line in lines if not outputs.done(line.id)]
        bad_todo = [b for b in bad if not outputs.done(b.id)]
        skipped = total - len(todo) - len(bad_todo)
        report = Report(outputs, total, skipped, args.quiet)
        stack.callback(outputs.write_annotations)  # also on Ctrl-C / SIGTERM: what finished is annotated
        for item in bad_todo:
            report.input_error(item, item.error)
        loaded_s = 0.0
        if todo and not remote:
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
