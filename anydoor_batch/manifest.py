"""The manifest: JSON Lines, one request per line keyed like ``/predict``, read through the request spec's codecs;
and the shard a line belongs to."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.errors import ErrorCode, InputError
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
from model.spec.limits import Limits
from model.spec.params import PARAM_NAMES, GenerationParams
from model.spec.placement import Placement

MANIFEST_KEYS = ("id", *KNOWN_FIELDS)
SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
RESERVED_IDS = ("classes",)  # labels/classes.txt lives next to labels/<id>.txt


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

    def inputs_record(self) -> dict[str, Any]:
        """The line's input files (absolute paths) and the one ratio an evaluation needs, for ``anydoor eval``."""
        return {"reference": [str(p) for p in self.references],
                "reference_mask": [str(p) for p in self.reference_masks], "background": str(self.background),
                "background_mask": None if self.background_mask is None else str(self.background_mask),
                "reference_expand_ratio": self.params.reference_expand_ratio}

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
    # A dataset line is one image with its labels (with num_outputs N: the best of N candidates), in its
    # output_format: images/<id>.png, .jpg or .webp.
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


def local_inputs(line: Line) -> GenerationInputs:
    """The images and target of one line for the in-process pipeline (it places a placement's boxes itself)."""
    return GenerationInputs(
        reference=line.references, background=line.background, reference_mask=line.reference_masks,
        background_mask=line.background_mask, boxes=line.boxes, placement=line.placement,
        placement_area=line.placement_area)


# --- shards ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """``--shard INDEX/COUNT``: the lines whose id hashes to ``INDEX`` modulo ``COUNT``.

    The hash is of the line's id alone (SHA-256, not Python's salted ``hash``), so a line's shard never depends on
    the other lines: adding lines to the manifest does not move finished ones to another shard, and the shards of
    one manifest are disjoint and cover it."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        index, sep, count = text.partition("/")
        if not sep or not index.strip().isdigit() or not count.strip().isdigit():
            raise ValueError(f"expected INDEX/COUNT (e.g. 0/4), got {text!r}")
        shard = cls(int(index), int(count))
        if shard.count < 1 or not 0 <= shard.index < shard.count:
            raise ValueError(f"INDEX must be in 0..COUNT-1 and COUNT at least 1, got {text!r}")
        return shard

    def holds(self, line_id: str) -> bool:
        return shard_of(line_id, self.count) == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def shard_of(line_id: str, count: int) -> int:
    """The shard (0..count-1) of a line id: a stable hash, the same on every machine and Python."""
    digest = hashlib.sha256(line_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count
