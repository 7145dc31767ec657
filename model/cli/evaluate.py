"""``anydoor eval DATASET [-o OUT]``: how faithful a set of insertions is, per line and overall.

DATASET is a directory written by ``anydoor batch`` (its ``results.jsonl`` names every image, its boxes and its
input files) or a JSON Lines file of finished insertions, one per line::

    {"id": "a", "reference": "obj.png", "background": "room.jpg", "box": "40,50,160,120", "result": "out.png",
     "ground_truth": "real.png"}

(``reference`` and ``box`` may be lists; ``reference_mask`` and ``background_mask`` as in a manifest; paths are
relative to the file). For each line it measures (definitions in :mod:`model.pipeline.scores`):

- ``identity`` (DINO-I): the mean over regions of the cosine similarity of DINOv2 class-token features between the
  reference as the model sees it and the generated region. The AnyDoor paper reports DINO-I 67.8 (and CLIP-I 82.1)
  on its benchmark, with DINOv2 features on the object crops; ours uses the pipeline's own DINOv2 encoder on the
  whole box, so compare runs of this command with each other, not with the paper's table;
- ``background_psnr``: PSNR of the result against the background outside the target regions;
- ``ssim``: SSIM inside the boxes against ``ground_truth``, where a line names one;
- ``clip_identity`` (CLIP-I), with ``--clip-weights FILE`` only: as ``identity``, with the image embeddings of a
  CLIP image tower (:mod:`model.nn.clip`; OpenAI, open_clip or Hugging Face checkpoints, read from the file given
  and never downloaded).

It writes ``eval.jsonl`` (one record per line, appended as it goes: a second run resumes), ``eval.json`` (all
lines and the means), ``eval.md`` (a Markdown table) and ``contact_sheet.png`` (reference, background with the box
drawn, result, score) into OUT (default ``DATASET/eval``, or beside the JSON Lines file). With ``--demo`` the
encoder has random weights: the identity numbers are meaningless.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model.errors import ErrorCode, InputError
from model.pipeline.loader import add_load_arguments, load_spec_of
from model.progress import ProgressBar

RECORDS = "eval.jsonl"
SHEET_ROWS = 24  # the contact sheet shows the first lines, in order
THUMB = 160


@dataclass(frozen=True)
class EvalLine:
    id: str
    references: tuple[Path, ...]
    reference_masks: tuple[Path, ...]
    background: Path
    background_mask: Path | None
    boxes: tuple[tuple[int, int, int, int], ...]
    result: Path
    ground_truth: Path | None = None
    reference_expand_ratio: float = 1.3


def _paths(value: Any, base: Path) -> tuple[Path, ...]:
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    return tuple((base / str(v)).resolve() for v in values)


def lines_of_dataset(dataset: Path) -> list[EvalLine]:
    """The lines to evaluate: the ok records of a batch directory, or the lines of a JSON Lines file."""
    from model.spec.codecs import decode_boxes

    lines: list[EvalLine] = []
    if dataset.is_dir():
        results = dataset / "results.jsonl"
        if not results.is_file():
            raise SystemExit(f"error: {dataset} has no results.jsonl (is it a directory written by anydoor batch?)")
        latest: dict[str, dict[str, Any]] = {}
        for text in results.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(text)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("id"), str):
                latest[record["id"]] = record
        for record in latest.values():
            if record.get("status") != "ok":
                continue
            inputs = record.get("inputs")
            if not isinstance(inputs, dict):
                raise SystemExit(f"error: line {record['id']!r} of {results} records no inputs: rerun it with this "
                                 "version of anydoor batch")
            lines.append(EvalLine(
                record["id"], _paths(inputs["reference"], dataset), _paths(inputs.get("reference_mask"), dataset),
                Path(inputs["background"]), Path(inputs["background_mask"]) if inputs.get("background_mask") else None,
                tuple(tuple(int(v) for v in box) for box in record["boxes"]),  # type: ignore[misc]
                dataset / record["file"], None, float(inputs.get("reference_expand_ratio", 1.3))))
        return lines
    base = dataset.parent
    for number, text in enumerate(dataset.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            raw = json.loads(text)
            boxes = decode_boxes([raw["box"]])
            lines.append(EvalLine(
                str(raw.get("id", number)), _paths(raw["reference"], base), _paths(raw.get("reference_mask"), base),
                _paths(raw["background"], base)[0],
                _paths(raw.get("background_mask"), base)[0] if raw.get("background_mask") else None,
                boxes, _paths(raw["result"], base)[0],
                _paths(raw.get("ground_truth"), base)[0] if raw.get("ground_truth") else None,
                float(raw.get("reference_expand_ratio", 1.3))))
        except (KeyError, TypeError, ValueError, InputError) as exc:
            raise SystemExit(f"error: {dataset} line {number}: {exc}") from None
    return lines


def evaluate_line(line: EvalLine, embed: Any, clip: Any = None) -> dict[str, Any]:
    """The scores of one line (``embed`` and ``clip``: images (B, 3, 224, 224) in [0, 1] -> features; no CLIP-I
    without ``clip``)."""
    from model.imaging.decode import load_image, load_mask, load_reference
    from model.imaging.preprocess import reference_view
    from model.pipeline.scores import background_psnr, identity_scores, region_view, ssim

    limit = 1 << 30
    result = load_image(line.result, field="result", max_pixels=limit)
    background = load_image(line.background, field="background", max_pixels=limit)
    if result.shape != background.shape:
        raise InputError("result", ErrorCode.INVALID_IMAGE, f"the result is {result.shape[1]}x{result.shape[0]}, "
                         f"the background {background.shape[1]}x{background.shape[0]}")
    masks: Sequence[Path | None] = line.reference_masks or [None] * len(line.references)
    views = []
    for reference, mask in zip(line.references, masks, strict=True):
        rgb, alpha = load_reference(reference, mask, max_pixels=limit)
        views.append(reference_view(rgb, alpha, line.reference_expand_ratio))
    refs = [views[i if len(views) > 1 else 0] for i in range(len(line.boxes))]
    generated = [region_view(result, box, refs[0].shape[0]) for box in line.boxes]
    identity = identity_scores(embed, refs, generated)
    inside = np.zeros(background.shape[:2], dtype=bool)
    if line.background_mask is not None:
        inside |= load_mask(line.background_mask, field="background_mask", size=background.shape[:2],
                            max_pixels=limit)
    for x, y, w, h in line.boxes:
        if line.background_mask is None:
            inside[y:y + h, x:x + w] = True
    record: dict[str, Any] = {
        "id": line.id, "identity": round(sum(identity) / len(identity), 6) if identity else None,
        "region_identity": [round(v, 6) for v in identity],
        "background_psnr": _round(background_psnr(result, background, inside)), "ssim": None,
        "file": str(line.result)}
    if clip is not None:
        clip_identity = identity_scores(clip, refs, generated)
        record["clip_identity"] = (round(sum(clip_identity) / len(clip_identity), 6) if clip_identity else None)
        record["region_clip_identity"] = [round(v, 6) for v in clip_identity]
    if line.ground_truth is not None:
        truth = load_image(line.ground_truth, field="ground_truth", max_pixels=limit)
        values = [ssim(result[y:y + h, x:x + w], truth[y:y + h, x:x + w]) for x, y, w, h in line.boxes]
        record["ssim"] = round(sum(values) / len(values), 6)
    return record


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    def mean(key: str) -> float | None:
        values = [r[key] for r in records if isinstance(r.get(key), int | float) and math.isfinite(r[key])]
        return round(sum(values) / len(values), 6) if values else None

    overall = {"lines": len(records), "identity": mean("identity"), "background_psnr": mean("background_psnr"),
               "ssim": mean("ssim")}
    if any("clip_identity" in r for r in records):
        overall["clip_identity"] = mean("clip_identity")
    return overall


def markdown(records: Sequence[dict[str, Any]], overall: dict[str, Any], demo: bool) -> str:
    def cell(value: Any) -> str:
        return "" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))

    clip = "clip_identity" in overall
    rows = ["| id | identity (DINO-I) |" + (" CLIP-I |" if clip else "") + " background PSNR (dB) | SSIM in box |",
            "| --- | ---: |" + (" ---: |" if clip else "") + " ---: | ---: |"]
    rows += [f"| {r['id']} | {cell(r['identity'])} |" + (f" {cell(r.get('clip_identity'))} |" if clip else "")
             + f" {cell(r['background_psnr'])} | {cell(r['ssim'])} |" for r in records]
    rows.append(f"| **mean** ({overall['lines']} lines) | {cell(overall['identity'])} |"
                + (f" {cell(overall['clip_identity'])} |" if clip else "")
                + f" {cell(overall['background_psnr'])} | {cell(overall['ssim'])} |")
    note = ("\nDEMO encoder (tiny random weights): the DINO-I numbers are meaningless.\n" if demo else "")
    return "# anydoor eval\n\n" + "\n".join(rows) + "\n" + note


def contact_sheet(lines: Sequence[EvalLine], records: dict[str, dict[str, Any]], path: Path) -> None:
    """A PNG grid, one row per line: reference, background with its boxes drawn, result, the scores."""
    from PIL import Image, ImageDraw, ImageOps

    shown = [line for line in lines if line.id in records][:SHEET_ROWS]
    sheet = Image.new("RGB", (THUMB * 4, THUMB * max(1, len(shown))), "white")
    draw = ImageDraw.Draw(sheet)
    for row, line in enumerate(shown):
        y = row * THUMB
        reference = ImageOps.exif_transpose(Image.open(line.references[0])).convert("RGB")
        background = ImageOps.exif_transpose(Image.open(line.background)).convert("RGB")
        marked = background.copy()
        pen = ImageDraw.Draw(marked)
        width = max(2, background.width // 200)
        for x0, y0, w, h in line.boxes:
            pen.rectangle((x0, y0, x0 + w - 1, y0 + h - 1), outline=(255, 32, 32), width=width)
        result = Image.open(line.result).convert("RGB")
        for col, image in enumerate((reference, marked, result)):
            thumb = ImageOps.contain(image, (THUMB - 8, THUMB - 8))
            sheet.paste(thumb, (col * THUMB + (THUMB - thumb.width) // 2, y + (THUMB - thumb.height) // 2))
        record = records[line.id]
        text = [line.id, f"DINO-I {record['identity']:.3f}" if record["identity"] is not None else "DINO-I -",
                f"PSNR {record['background_psnr']:.2f} dB" if record["background_psnr"] is not None else "PSNR inf",
                f"SSIM {record['ssim']:.3f}" if record["ssim"] is not None else "",
                f"CLIP-I {record['clip_identity']:.3f}" if record.get("clip_identity") is not None else ""]
        draw.multiline_text((3 * THUMB + 8, y + 8), "\n".join(t for t in text if t), fill="black", spacing=6)
    tmp = path.with_name(f".{path.name}.tmp")
    sheet.save(tmp, format="PNG")
    os.replace(tmp, path)


def register(sub: Any) -> None:
    p = sub.add_parser("eval", help="score a dataset: identity (DINO-I, CLIP-I), background PSNR, SSIM",
                       description="Score the insertions of DATASET (a directory written by anydoor batch, or a "
                       "JSON Lines file of finished insertions): per line and overall, the identity (DINO-I), the "
                       "background PSNR, against a ground truth SSIM in the box, and with --clip-weights CLIP-I. "
                       "Writes eval.jsonl (resumable), eval.json, eval.md and contact_sheet.png into OUT.")
    p.add_argument("dataset", type=Path, metavar="DATASET",
                   help="a directory written by anydoor batch, or a JSON Lines file of finished insertions")
    p.add_argument("-o", "--output", type=Path, help="where to write (default: DATASET/eval, or beside the file)")
    add_load_arguments(p)
    clip = p.add_argument_group("CLIP-I (optional)")
    clip.add_argument("--clip-weights", type=Path, metavar="FILE",
                      help="a CLIP checkpoint with a ViT image tower (OpenAI .pt, open_clip or Hugging Face "
                      ".safetensors/.bin): also score CLIP-I. Read from FILE, never downloaded")
    clip.add_argument("--clip-heads", type=int, metavar="N",
                      help="attention heads of its image tower (default: config.json beside FILE, else width/64 "
                      "as in OpenAI's models)")
    clip.add_argument("--clip-activation", choices=("quick_gelu", "gelu"),
                      help="its MLP activation (default: config.json beside FILE, else quick_gelu as in OpenAI's "
                      "models)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def load_clip(args: argparse.Namespace) -> Any:
    """The CLIP image tower of ``--clip-weights`` on the CPU, or None; ``ValueError`` naming the flag when it
    cannot be read."""
    if args.clip_weights is None:
        return None
    from model.nn.clip import load_clip_vision
    from model.weights.checkpoint import CheckpointError

    if args.clip_heads is not None and args.clip_heads < 1:
        raise ValueError("--clip-heads must be at least 1")
    try:
        return load_clip_vision(args.clip_weights, heads=args.clip_heads, activation=args.clip_activation)
    except (FileNotFoundError, CheckpointError) as exc:
        raise ValueError(f"--clip-weights: {exc}") from None


def run(args: argparse.Namespace) -> int:
    from model.pipeline.loader import load_pipeline

    dataset: Path = args.dataset
    if not dataset.exists():
        print(f"error: {dataset} does not exist", file=sys.stderr)
        return 2
    out: Path = args.output or (dataset / "eval" if dataset.is_dir() else dataset.with_suffix("").parent / "eval")
    lines = lines_of_dataset(dataset)
    out.mkdir(parents=True, exist_ok=True)
    records: dict[str, dict[str, Any]] = {}
    log = out / RECORDS
    if log.exists():  # resume: lines already scored are kept
        for text in log.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(text)
                records[record["id"]] = record
            except (ValueError, KeyError, TypeError):
                continue
    wants_clip = args.clip_weights is not None
    # Resume: a line is scored again only if it lacks a score asked for now (CLIP-I added on a second run).
    todo = [line for line in lines
            if line.id not in records or (wants_clip and "clip_identity" not in records[line.id])]
    failed = 0
    if todo:
        try:
            clip = load_clip(args)  # before the pipeline: a bad file fails at once
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        pipe = load_pipeline(load_spec_of(args))
        if clip is not None:
            clip = clip.to(pipe.model.device)
        if args.demo:
            print("DEMO MODEL: tiny random weights; the identity scores are meaningless.", file=sys.stderr)
        bar = ProgressBar("eval", not args.quiet, unit="lines")
        bar.begin(len(lines) - len(todo), len(lines))
        with log.open("a", encoding="utf-8") as f:
            for done, line in enumerate(todo, start=len(lines) - len(todo) + 1):
                try:
                    record = evaluate_line(line, pipe.model.embed_images, clip)
                except (InputError, OSError, ValueError) as exc:
                    failed += 1
                    print(f"error: line {line.id}: {exc}", file=sys.stderr)
                    continue
                records[line.id] = record
                f.write(json.dumps(record) + "\n")
                f.flush()
                bar.update(done)
        bar.end(len(lines))
    ordered = [records[line.id] for line in lines if line.id in records]
    overall = summary(ordered)
    payload = {"dataset": str(dataset), "demo": bool(args.demo), "mean": overall, "lines": ordered}
    (out / "eval.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    (out / "eval.md").write_text(markdown(ordered, overall, bool(args.demo)), encoding="utf-8")
    contact_sheet(lines, records, out / "contact_sheet.png")
    print(f"eval: {overall['lines']} line(s), identity {overall['identity']}, background PSNR "
          f"{overall['background_psnr']} dB, SSIM {overall['ssim']} -> {out}")
    return 1 if failed else 0
