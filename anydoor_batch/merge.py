"""``anydoor merge``: the output directories of several runs (the shards of one manifest) as one dataset.

The merged directory has every image, one ``results.jsonl`` (the latest record of each id; an ``ok`` one wins over
a failure), the YOLO labels (rewritten with the merged class list) and one COCO file with unique image and
annotation ids. Merging is idempotent: an id already in the merged directory with the same image bytes is left
as it is, so merging again (or merging more shards in later) changes nothing that was there. Two directories that
hold the same id with different image bytes are refused (``conflicting_shards``, exit status 3) before anything
is written.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anydoor_batch.dataset import Outputs, read_classes, read_records

PROG = "anydoor merge"
CONFLICT = "conflicting_shards"  # the error code of two shards that disagree about an id's image
EXIT_USAGE, EXIT_CONFLICT = 2, 3


class MergeError(Exception):
    def __init__(self, code: str, message: str, exit_status: int) -> None:
        super().__init__(message)
        self.code, self.message, self.exit_status = code, message, exit_status


@dataclass
class Source:
    """One input directory: its records and classes."""

    root: Path
    records: dict[str, dict[str, Any]]
    classes: list[str]

    @classmethod
    def open(cls, root: Path) -> Source:
        if not (root / "results.jsonl").is_file():
            raise MergeError("not_a_dataset", f"{root} has no results.jsonl: not an `anydoor batch` output", EXIT_USAGE)
        return cls(root, read_records(root / "results.jsonl"), read_classes(root / "labels" / "classes.txt"))

    def image(self, line_id: str) -> bytes:
        path = self.root / str(self.records[line_id].get("file") or f"images/{line_id}.png")
        try:
            return path.read_bytes()
        except OSError as exc:
            raise MergeError("missing_image", f"{path}: the ok record of {line_id!r} has no image ({exc.strerror})",
                             EXIT_USAGE) from None


def plan(sources: list[Source], existing: dict[str, dict[str, Any]], existing_image: Any
         ) -> tuple[list[tuple[dict[str, Any], bytes]], list[dict[str, Any]]]:
    """What to write: the ok records (with their images) and the failed ones that are new to the merged directory;
    :class:`MergeError` on a conflict, before anything is written."""
    chosen: dict[str, tuple[dict[str, Any], bytes, Path]] = {}
    failed: dict[str, dict[str, Any]] = {}
    for source in sources:
        for line_id, record in sorted(source.records.items(), key=lambda item: (item[1].get("line", 0), item[0])):
            if record.get("status") != "ok":
                failed.setdefault(line_id, record)
                continue
            png = source.image(line_id)
            if line_id in chosen:
                if chosen[line_id][1] != png:
                    raise MergeError(CONFLICT, f"id {line_id!r} is in {chosen[line_id][2]} and {source.root} with "
                                     "different image bytes (shards of different manifests or settings?)",
                                     EXIT_CONFLICT)
                continue
            chosen[line_id] = (record, png, source.root)
    new_ok = []
    for line_id, (record, png, root) in chosen.items():
        old = existing.get(line_id)
        if old is not None and old.get("status") == "ok":
            if existing_image(line_id) != png:
                raise MergeError(CONFLICT, f"id {line_id!r} of {root} is already in the merged directory with "
                                 "different image bytes", EXIT_CONFLICT)
            continue
        new_ok.append((record, png))
    new_failed = [r for i, r in failed.items() if i not in chosen and existing.get(i) != r and
                  (existing.get(i) or {}).get("status") != "ok"]
    return new_ok, new_failed


def image_numbers(records: dict[str, dict[str, Any]]) -> dict[str, int]:
    """COCO image ids of the ok records: their manifest line numbers where those are unique (the shards of one
    manifest: the same ids as an unsharded run), else 1..n in line order."""
    ok = sorted(((r.get("line", 0), i) for i, r in records.items() if r.get("status") == "ok"))
    numbers = {line_id: int(line) for line, line_id in ok}
    if len(set(numbers.values())) == len(numbers) and all(isinstance(n, int) and n > 0 for n in numbers.values()):
        return numbers
    return {line_id: index for index, (_, line_id) in enumerate(ok, start=1)}


def merge(inputs: list[Path], output: Path) -> tuple[int, int]:
    """Merge ``inputs`` into ``output``; (ok records added, failed records added). Raises :class:`MergeError`."""
    roots = [path.resolve() for path in inputs]
    if output.resolve() in roots:
        raise MergeError("invalid_parameter", f"the output {output} is also an input", EXIT_USAGE)
    if len(set(roots)) != len(roots):
        raise MergeError("invalid_parameter", "an input directory is given twice", EXIT_USAGE)
    sources = [Source.open(path) for path in inputs]
    try:
        outputs = Outputs(output, annotations_every=10**9)
    except (OSError, RuntimeError) as exc:
        raise MergeError("invalid_parameter", f"cannot use the output directory {output}: {exc}", EXIT_USAGE) from None
    try:
        new_ok, new_failed = plan(sources, outputs.records,
                                  lambda line_id: outputs.image_path(outputs.records[line_id]).read_bytes())
        outputs.add_classes([name for source in sources for name in source.classes] +
                            [name for record, _ in new_ok for name in record["classes"]])
        for record, png in new_ok:
            outputs.add(record, png)
        for record in new_failed:
            outputs.add_failed(record)
        outputs.manifest_lines = image_numbers(outputs.records)
        outputs.write_annotations()
    finally:
        outputs.close()
    return len(new_ok), len(new_failed)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "merge", help="join the output directories of `anydoor batch --shard` runs into one dataset",
        description="Merge the OUT directories of several `anydoor batch` runs (typically --shard 0/N .. N-1/N of "
        "one manifest) into MERGED: all images, one results.jsonl, one COCO annotations.json with unique image and "
        "annotation ids, the YOLO labels. Idempotent. Exit status: 0 merged, 2 usage error, 3 two inputs hold the "
        f"same id with different image bytes ({CONFLICT}; nothing is written).")
    p.add_argument("inputs", nargs="+", type=Path, metavar="OUT", help="an `anydoor batch` output directory")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="MERGED", help="the merged directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        added, failed = merge(args.inputs, args.output)
    except MergeError as exc:
        print(f"{PROG}: error [{exc.code}]: {exc.message}", file=sys.stderr)
        return exc.exit_status
    total = len(read_records(args.output / "results.jsonl"))
    print(f"merge: {added} images and {failed} failed records added from {len(args.inputs)} directories; "
          f"{args.output}/ holds {total} ids")
    return 0
