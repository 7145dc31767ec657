"""The output directory: images, ``results.jsonl``, COCO (``annotations.json``) and YOLO (``labels/``), every file
written so that a kill at any moment leaves it whole; one writer at a time (a lock file)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from anydoor_batch.manifest import Line
from model.spec.inputs import Box

PROG = "anydoor batch"
TMP_SUFFIX = ".anydoor-tmp"  # our temporary files: .<name>.<8 hex>.anydoor-tmp; the clean-up touches no other
TMP_NAME = re.compile(r"\..+\.[0-9a-f]{8}" + re.escape(TMP_SUFFIX))


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
    """What a line gave: its image (encoded in the line's ``output_format``) and what the annotations need."""

    image: bytes
    width: int
    height: int
    seed: int
    boxes: list[Box]
    timings: dict[str, float]
    extra: dict[str, Any] = field(default_factory=dict)
    suffix: str = ".png"  # the image file's: OUTPUT_FORMATS[output_format][1]


def best_of(results: Sequence[Any]) -> tuple[Any, dict[str, Any]]:
    """The best of a line's candidates (one per seed, ``num_outputs`` of them; ranked as /predict ranks them) and
    what its record adds: the best one's ``scores`` and, with several, ``candidates``: each one's seed and scores,
    best first (any one is that line again with ``num_outputs`` 1 and its seed)."""
    from model.pipeline.result import rank_candidates

    best = rank_candidates(results)
    extra: dict[str, Any] = {}
    if best.scores is not None:
        extra["scores"] = best.scores.to_dict()
    if best.candidates:
        extra["candidates"] = [{"seed": c.seed, "scores": c.scores.to_dict() if c.scores is not None else None}
                               for c in best.candidates]
    return best, extra


def read_records(path: Path) -> dict[str, dict[str, Any]]:
    """The latest record of each id in a results.jsonl (read only; a last line cut short is not one)."""
    records: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return records
    data = path.read_bytes()
    for text in data[:data.rfind(b"\n") + 1].decode("utf-8", errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(text)
            if isinstance(record, dict) and isinstance(record.get("id"), str):
                records[record["id"]] = record
    return records


def read_classes(path: Path) -> list[str]:
    """The class names of a labels/classes.txt, in index order."""
    if not path.exists():
        return []
    return [name for name in path.read_text(encoding="utf-8").splitlines() if name]


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
            raise RuntimeError(f"another `{PROG}` or `anydoor merge` is writing to {root}") from None
        for folder in (self.images, self.labels, root):  # our temporary files of a run that was killed
            for stale in folder.glob(f".*{TMP_SUFFIX}"):
                if TMP_NAME.fullmatch(stale.name) and stale.is_file():
                    stale.unlink(missing_ok=True)
        self.records = self._load()
        self.classes = self._load_classes()
        self._results: IO[str] = self.results_path.open("a", encoding="utf-8")

    def _load(self) -> dict[str, dict[str, Any]]:
        """The latest record of each id in results.jsonl; a last line cut short by a kill is dropped."""
        if self.results_path.exists():
            data = self.results_path.read_bytes()
            end = data.rfind(b"\n") + 1
            if end < len(data):
                with self.results_path.open("r+b") as f:  # a partial last line would glue onto the next append
                    f.truncate(end)
        return read_records(self.results_path)

    def _load_classes(self) -> list[str]:
        return read_classes(self.classes_path)

    def done(self, line_id: str) -> bool:
        record = self.records.get(line_id)
        return bool(record and record.get("status") == "ok" and self.image_path(record).is_file())

    def image_path(self, record: dict[str, Any]) -> Path:
        """Where an ok record's image is: its ``file`` (``images/<id>.png``, ``.jpg`` or ``.webp``)."""
        return self.root / str(record.get("file") or f"images/{record['id']}.png")

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
        record = {"id": line.id, "line": line.number, "status": "ok", "seed": result.seed,
                  "boxes": [list(b) for b in result.boxes], "classes": line.classes(len(result.boxes)),
                  "file": f"images/{line.id}{result.suffix}", "width": result.width, "height": result.height,
                  "timings": {k: round(v, 4) for k, v in result.timings.items()},
                  "inputs": line.inputs_record(), **result.extra}
        self.add(record, result.image)

    def labels_of(self, record: dict[str, Any]) -> bytes:
        """The YOLO label file of an ok record: ``class cx cy w h`` per object, normalised to the image."""
        width, height = record["width"], record["height"]
        labels = []
        for (x, y, w, h), name in zip(record["boxes"], record["classes"], strict=True):
            cx, cy = (x + w / 2) / width, (y + h / 2) / height
            labels.append(f"{self.classes.index(name)} {cx:.6f} {cy:.6f} {w / width:.6f} {h / height:.6f}\n")
        return "".join(labels).encode("utf-8")

    def add(self, record: dict[str, Any], image: bytes) -> None:
        """An ok record with its image: the image and label first, so an ok record always has its files (files
        without a record are redone)."""
        with self._lock:
            atomic_write(self.image_path(record), image)
            atomic_write(self.labels / f"{record['id']}.txt", self.labels_of(record))
            self._append(record)
            self._tick()

    def add_failed(self, record: dict[str, Any]) -> None:
        with self._lock:
            self._append(record)
            self._tick()

    def failed(self, number: int, line_id: str, code: str, field_name: str | None, message: str,
               seed: int | None = None) -> None:
        self.add_failed({"id": line_id, "line": number, "status": "failed", "seed": seed,
                         "error": {"code": code, "field": field_name, "message": message}})

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
        for number, _line_id, record in done:
            images.append({"id": number, "file_name": self.image_path(record).name, "width": record["width"],
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
