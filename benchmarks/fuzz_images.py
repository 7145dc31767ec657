"""Mutation fuzzer for the upload decoders: every input must decode or be refused with an InputError, quickly.

It builds small valid seed images in every accepted format (PNG, APNG, JPEG baseline/progressive/CMYK/EXIF, WebP
lossy/lossless/animated, GIF static/animated, BMP 1/8/24/32-bit and top-down) and in refused ones (EPS, PDF, SVG,
TIFF, AVIF, JPEG 2000, DDS, BLP, ICNS, ICO, PSD, QOI, SPIDER, RLE BMP, ...), mutates them (bit flips, byte
inserts and deletes, truncation, header fields overwritten with extreme values such as a width of 0xFFFFFFFF,
duplicated, dropped and amplified chunks, splices between formats) and feeds each input to
``load_image``, ``load_mask`` and ``load_reference`` from :mod:`model.imaging.decode`, the way the service does
(``max_pixels`` 16,777,216, the service's default).

Each call is classified: ``ok``, rejected with an ``InputError`` (counted by code), or a **bug**: any other
exception, an InputError naming the wrong field, or a result of the wrong shape or dtype. An input is also a bug
when one of its calls takes more than ``--slow-s`` (2 s) or grows the resident set by more than ``--max-mib``
(512 MiB; sampled from /proc/self/statm, so the C decoders' allocations count too). One summary line is printed;
the exit status is 1 if any bug was found. ``--corpus-out DIR`` writes every bug and the slowest and largest
inputs there; files or folders given as arguments are replayed instead of fuzzing.

    .venv/bin/python benchmarks/fuzz_images.py --iterations 3000 --seed 1 --time-budget-s 170
    .venv/bin/python benchmarks/fuzz_images.py --corpus-out /tmp/fuzz-worst --json /tmp/fuzz.json
    .venv/bin/python benchmarks/fuzz_images.py tests/fixtures/fuzz          # replay a corpus
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import struct
import sys
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as `python benchmarks/fuzz_images.py` from a checkout
    sys.path.insert(0, str(REPO))

from model.errors import ErrorCode, InputError  # noqa: E402
from model.imaging import decode  # noqa: E402

MAX_PIXELS = 16_777_216
"""The service's default ``ANYDOOR_MAX_PIXELS``."""
MIB = 1 << 20
EXTREME_INTS = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)


# ----------------------------------------------------------------------------------------------------- seeds


def _encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _bmp_rle(width: int, height: int, body: bytes, compression: int) -> bytes:
    """A hand-made RLE8 (1) or RLE4 (2) BMP: Pillow cannot write them."""
    bits = 8 if compression == 1 else 4
    palette = bytes(4 * (1 << bits))
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, bits, compression, len(body), 0, 0, 1 << bits, 0)
    offset = 14 + len(info) + len(palette)
    return b"BM" + struct.pack("<IHHI", offset + len(body), 0, 0, offset) + info + palette + body


def build_seeds() -> dict[str, bytes]:
    """Small valid files, keyed ``format_variant``: the accepted formats first, then refused ones."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    yy, xx = np.mgrid[:24, :32]
    disc = ((yy - 12) ** 2 + (xx - 16) ** 2 <= 9**2).astype(np.uint8) * 255
    rgba = Image.fromarray(np.dstack([np.asarray(rgb), disc]), "RGBA")
    grey = Image.fromarray(disc, "L")
    exif = Image.Exif()
    exif[0x0112] = 6
    frames = [Image.new("RGB", (32, 24), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    seeds: dict[str, bytes] = {
        "png_rgb": _encode(rgb, "PNG"),
        "png_rgba": _encode(rgba, "PNG"),
        "png_grey": _encode(grey, "PNG"),
        "png_16bit": _encode(Image.fromarray(np.asarray(grey).astype(np.uint16) * 257), "PNG"),
        "png_palette_trns": _encode(rgba.convert("RGB").quantize(16), "PNG", transparency=0),
        "png_1bit": _encode(grey.convert("1"), "PNG"),
        "png_exif": _encode(rgb, "PNG", exif=exif.tobytes()),
        "png_text": _encode(rgb, "PNG", pnginfo=_pnginfo()),
        "png_apng": _encode(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=50),
        "jpeg_baseline": _encode(rgb, "JPEG", quality=90),
        "jpeg_progressive": _encode(rgb, "JPEG", progressive=True),
        "jpeg_grey": _encode(grey, "JPEG"),
        "jpeg_cmyk": _encode(rgb.convert("CMYK"), "JPEG"),
        "jpeg_exif": _encode(rgb, "JPEG", exif=exif.tobytes()),
        "jpeg_restart": _encode(rgb, "JPEG", restart_marker_blocks=1),
        "webp_lossy": _encode(rgb, "WEBP", quality=80),
        "webp_lossless": _encode(rgba, "WEBP", lossless=True),
        "webp_alpha": _encode(rgba, "WEBP", quality=80),
        "webp_anim": _encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=50),
        "gif_static": _encode(rgb, "GIF"),
        "gif_transparent": _encode(rgba.convert("P"), "GIF", transparency=0),
        "gif_anim": _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0),
        "gif_interlaced": _encode(rgb, "GIF", interlace=True),
        "bmp_24": _encode(rgb, "BMP"),
        "bmp_32": _encode(rgba, "BMP"),
        "bmp_8": _encode(rgb.quantize(64), "BMP"),
        "bmp_1": _encode(grey.convert("1"), "BMP"),
    }
    top_down = bytearray(seeds["bmp_24"])
    top_down[22:26] = struct.pack("<i", -24)  # a negative height: rows stored top to bottom
    seeds["bmp_topdown"] = bytes(top_down)
    # Refused formats: what Pillow can write, and hand-made headers for the rest.
    for name, fmt, image in (("tiff", "TIFF", rgb), ("ico", "ICO", rgb), ("icns", "ICNS", rgb),
                             ("dds", "DDS", rgb), ("avif", "AVIF", rgb), ("jpeg2000", "JPEG2000", rgb),
                             ("qoi", "QOI", rgb), ("spider", "SPIDER", rgb.convert("F")), ("pcx", "PCX", rgb),
                             ("tga", "TGA", rgb), ("sgi", "SGI", rgb), ("ppm", "PPM", rgb), ("im", "IM", rgb),
                             ("xbm", "XBM", grey.convert("1")), ("eps", "EPS", rgb), ("pdf", "PDF", rgb),
                             ("blp", "BLP", rgb.quantize(16))):
        try:
            seeds[f"refused_{name}"] = _encode(image, fmt)
        except (KeyError, OSError, ValueError):  # a codec this Pillow build lacks
            pass
    seeds["refused_eps_header"] = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 24\n%%EndComments\nshowpage\n"
    seeds["refused_svg"] = (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="32" height="24">'
                            b'<rect width="32" height="24" fill="red"/></svg>')
    seeds["refused_psd"] = b"8BPS\x00\x01" + bytes(6) + struct.pack(">HIIHH", 3, 24, 32, 8, 3) + bytes(64)
    seeds["refused_blp_header"] = b"BLP2" + struct.pack("<IBBBBII", 1, 2, 8, 7, 0, 32, 24) + bytes(148)
    seeds["refused_bmp_rle8"] = _bmp_rle(32, 24, (b"\x20\x07\x00\x00") * 24 + b"\x00\x01", 1)
    seeds["refused_bmp_rle4"] = _bmp_rle(32, 24, (b"\x20\x35\x00\x00") * 24 + b"\x00\x01", 2)
    seeds["not_text"] = b"this is not an image"
    return seeds


def build_big_seeds() -> dict[str, bytes]:
    """Small files announcing the service's largest size (4096x4096): where a per-scan, per-frame or per-pixel
    cost would show (a mutated copy with duplicated scans or frames), at the price of slower decoding."""
    flat = Image.new("RGB", (4096, 4096), (30, 120, 200))
    frames = [Image.new("RGB", (4096, 4096), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    return {
        "big_jpeg_progressive": _encode(flat.convert("L"), "JPEG", progressive=True),
        "big_png": _encode(flat, "PNG"),
        "big_png_apng": _encode(frames[0], "PNG", save_all=True, append_images=frames[1:]),
        "big_gif_anim": _encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "big_webp_lossless": _encode(flat, "WEBP", lossless=True),
        "big_webp_anim": _encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True),
    }


def _pnginfo() -> Any:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "plain text chunk")
    info.add_text("Description", "compressed text chunk " * 4, zip=True)
    info.add_itxt("Title", "international text", lang="en", tkey="Title", zip=True)
    return info


# ------------------------------------------------------------------------------------------------- mutations


def _chunks(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each PNG chunk, JPEG segment, RIFF chunk or GIF block found by a lenient walk."""
    spans: list[tuple[int, int]] = []
    if data.startswith(b"\x89PNG"):
        pos = 8
        while pos + 12 <= len(data):
            end = pos + 12 + struct.unpack_from(">I", data, pos)[0]
            spans.append((pos, min(end, len(data))))
            pos = end
    elif data.startswith(b"\xff\xd8"):
        pos = 2
        while pos + 4 <= len(data) and data[pos] == 0xFF:
            end = pos + 2 + struct.unpack_from(">H", data, pos + 2)[0]
            spans.append((pos, min(end, len(data))))
            if data[pos + 1] == 0xDA:
                spans.append((end, len(data) - 2))  # the entropy-coded rest, as one span
                break
            pos = end
    elif data.startswith(b"RIFF"):
        pos = 12
        while pos + 8 <= len(data):
            end = pos + 8 + struct.unpack_from("<I", data, pos + 4)[0]
            end += end & 1
            spans.append((pos, min(end, len(data))))
            pos = end
    else:  # GIF, BMP and the rest: fixed 16-byte slices are enough to splice and repeat
        spans = [(pos, min(pos + 16, len(data))) for pos in range(0, len(data), 16)]
    return [span for span in spans if span[1] > span[0]]


def _flip_bits(rng: random.Random, data: bytearray, _: dict[str, bytes]) -> str:
    for _count in range(rng.randint(1, 8)):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return "bitflip"


def _set_bytes(rng: random.Random, data: bytearray, _: dict[str, bytes]) -> str:
    for _count in range(rng.randint(1, 4)):
        data[rng.randrange(len(data))] = rng.choice((0x00, 0xFF, 0x7F, 0x80, rng.randrange(256)))
    return "byteset"


def _insert(rng: random.Random, data: bytearray, _: dict[str, bytes]) -> str:
    pos = rng.randrange(len(data) + 1)
    data[pos:pos] = rng.randbytes(rng.choice((1, 2, 4, 16, 256)))
    return "insert"


def _delete(rng: random.Random, data: bytearray, _: dict[str, bytes]) -> str:
    pos = rng.randrange(len(data))
    del data[pos : pos + rng.choice((1, 2, 4, 16, 256))]
    return "delete"


def _truncate(rng: random.Random, data: bytearray, _: dict[str, bytes]) -> str:
    del data[rng.randrange(1, len(data) + 1) :]
    return "truncate"


def _extreme_int(rng: random.Random, data: bytearray, _: dict[str, bytes]) -> str:
    """Overwrite a header field (most likely within the first 64 bytes) with an extreme 16- or 32-bit value."""
    width = rng.choice((2, 4))
    limit = min(len(data), 64 if rng.random() < 0.8 else len(data)) - width
    if limit <= 0:
        return "extreme(noop)"
    pos = rng.randrange(limit + 1)
    value = rng.choice(EXTREME_INTS) & ((1 << (8 * width)) - 1)
    data[pos : pos + width] = value.to_bytes(width, rng.choice(("big", "little")))
    return "extreme"


def _dimensions(rng: random.Random, data: bytearray, _: dict[str, bytes]) -> str:
    """Set the width and/or height where each format keeps them to an extreme value."""
    value = rng.choice(EXTREME_INTS[3:] + (4097, 16_385, 65_535))
    if data.startswith(b"\x89PNG") and len(data) >= 24:
        pos = rng.choice((16, 20))
        data[pos : pos + 4] = (value & 0xFFFFFFFF).to_bytes(4, "big")
    elif data.startswith(b"\xff\xd8"):
        sof = next((i for i in range(len(data) - 9) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC1, 0xC2)), -1)
        if sof < 0:
            return "dims(noop)"
        pos = sof + rng.choice((5, 7))
        data[pos : pos + 2] = (value & 0xFFFF).to_bytes(2, "big")
    elif data.startswith(b"GIF") and len(data) >= 10:
        pos = rng.choice((6, 8))
        data[pos : pos + 2] = (value & 0xFFFF).to_bytes(2, "little")
    elif data.startswith(b"BM") and len(data) >= 26:
        pos = rng.choice((18, 22))
        data[pos : pos + 4] = (value & 0xFFFFFFFF).to_bytes(4, "little")
    elif data.startswith(b"RIFF") and len(data) >= 30:
        if data[12:16] == b"VP8X":
            pos = rng.choice((24, 27))
            data[pos : pos + 3] = (value & 0xFFFFFF).to_bytes(3, "little")
        else:
            pos = rng.choice((26, 28, 21))
            data[pos : pos + 2] = (value & 0xFFFF).to_bytes(2, "little")
    else:
        return "dims(noop)"
    return "dims"


def _duplicate_chunk(rng: random.Random, data: bytearray, _: dict[str, bytes]) -> str:
    spans = _chunks(bytes(data))
    if not spans:
        return "dup(noop)"
    start, end = rng.choice(spans)
    data[end:end] = data[start:end] * rng.choice((1, 1, 2, 8))
    return "dupchunk"


def _amplify(rng: random.Random, data: bytearray, _: dict[str, bytes]) -> str:
    """Repeat one chunk hundreds of times: the inputs whose cost is per chunk or per scan."""
    spans = _chunks(bytes(data))
    if not spans:
        return "amplify(noop)"
    start, end = rng.choice(spans)
    copies = max(1, min(rng.choice((64, 256, 1024)), 200_000 // max(1, end - start)))
    data[end:end] = data[start:end] * copies
    return "amplify"


def _drop_chunk(rng: random.Random, data: bytearray, _: dict[str, bytes]) -> str:
    spans = _chunks(bytes(data))
    if not spans:
        return "drop(noop)"
    start, end = rng.choice(spans)
    del data[start:end]
    return "dropchunk"


def _truncate_chunk(rng: random.Random, data: bytearray, _: dict[str, bytes]) -> str:
    spans = _chunks(bytes(data))
    if not spans:
        return "chunkcut(noop)"
    start, end = rng.choice(spans)
    del data[rng.randrange(start, end) : end]
    return "chunkcut"


def _splice(rng: random.Random, data: bytearray, seeds: dict[str, bytes]) -> str:
    other = seeds[rng.choice(sorted(seeds))]
    cut, other_cut = rng.randrange(len(data) + 1), rng.randrange(len(other) + 1)
    data[cut:] = other[other_cut:]
    return "splice"


MUTATORS: tuple[Callable[[random.Random, bytearray, dict[str, bytes]], str], ...] = (
    _flip_bits, _set_bytes, _insert, _delete, _truncate, _extreme_int, _extreme_int, _dimensions, _dimensions,
    _duplicate_chunk, _amplify, _drop_chunk, _truncate_chunk, _splice,
)


def mutate(rng: random.Random, seed: bytes, seeds: dict[str, bytes]) -> tuple[bytes, list[str]]:
    data = bytearray(seed)
    applied = []
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4))):
        if not data:
            break
        applied.append(rng.choice(MUTATORS)(rng, data, seeds))
    return bytes(data), applied


# ------------------------------------------------------------------------------------------------- execution


class MemorySampler:
    """Peak resident-set growth during a block, sampled every 2 ms by a thread (C allocations included)."""

    def __init__(self) -> None:
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self._statm = Path("/proc/self/statm")
        self._lock = threading.Lock()
        self._running = False
        self._base = self._peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def rss(self) -> int:
        try:
            return int(self._statm.read_text().split()[1]) * self._page
        except (OSError, ValueError, IndexError):
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            if self._running:
                value = self.rss()
                with self._lock:
                    self._peak = max(self._peak, value)

    def start(self) -> None:
        with self._lock:
            self._base = self._peak = self.rss()
            self._running = True

    def stop(self) -> int:
        value = self.rss()
        with self._lock:
            self._running = False
            return max(self._peak, value) - self._base


@dataclass
class Outcome:
    calls: list[str]  # per call: "ok", an error code, or "bug:<description>"
    seconds: float  # the slowest call's wall time
    grown_bytes: int  # the largest resident-set growth during one call

    @property
    def bugs(self) -> list[str]:
        return [call for call in self.calls if call.startswith("bug:")]


CAUSES: Counter[str] = Counter()
"""The exception each rejection was translated from (``InputError.__cause__``): what would otherwise escape."""


def _check_call(name: str, call: Callable[[], Any], fields: tuple[str, ...], check: Callable[[Any], bool]) -> str:
    try:
        result = call()
    except InputError as exc:
        if not isinstance(exc.code, ErrorCode):
            return f"bug:{name} raised an InputError without an ErrorCode"
        if exc.field not in fields:
            return f"bug:{name} named field {exc.field!r}"
        if exc.__cause__ is not None:
            CAUSES[f"{exc.code.value}<-{type(exc.__cause__).__name__}"] += 1
        bomb = (Image.DecompressionBombError, Image.DecompressionBombWarning)
        if isinstance(exc.__cause__, bomb) and MAX_PIXELS <= (Image.MAX_IMAGE_PIXELS or MAX_PIXELS):
            # Our limit is below Pillow's, so our header check should have refused this first: it misread the size.
            return f"bug:{name}: Pillow's bomb check fired before the header check ({exc.__cause__})"
        return exc.code.value
    except Exception as exc:  # the point of the exercise: anything else escaping a decoder is a bug
        return f"bug:{name} raised {type(exc).__name__}: {str(exc)[:200]}"
    return "ok" if check(result) else f"bug:{name} returned a malformed result"


def _is_rgb(array: Any) -> bool:
    return isinstance(array, np.ndarray) and array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3


def _is_mask(array: Any) -> bool:
    return isinstance(array, np.ndarray) and array.dtype == bool and array.ndim == 2


def _is_reference(result: Any) -> bool:
    rgb, mask = result
    return _is_rgb(rgb) and _is_mask(mask) and rgb.shape[:2] == mask.shape


def run_input(data: bytes, sampler: MemorySampler, max_pixels: int = MAX_PIXELS) -> Outcome:
    """Decode ``data`` as the service does: as the background, as a mask and as the reference.

    Time and memory are each call's worst: the service decodes an upload once, as one of these.
    """
    calls: list[Callable[[], str]] = [
        lambda: _check_call("load_image", lambda: decode.load_image(data, field="background", max_pixels=max_pixels),
                            ("background",), _is_rgb),
        lambda: _check_call(
            "load_mask", lambda: decode.load_mask(data, field="background_mask", size=None, max_pixels=max_pixels),
            ("background_mask",), _is_mask),
        lambda: _check_call("load_reference", lambda: decode.load_reference(data, max_pixels=max_pixels),
                            ("reference", "reference_mask"), _is_reference),
    ]
    results, seconds, grown = [], 0.0, 0
    for call in calls:
        started = time.perf_counter()
        sampler.start()
        results.append(call())
        grown = max(grown, sampler.stop())
        seconds = max(seconds, time.perf_counter() - started)
    return Outcome(results, seconds, grown)


@dataclass
class Report:
    tried: int = 0
    ok: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    bugs: list[dict[str, Any]] = field(default_factory=list)
    slowest: list[tuple[float, str, bytes]] = field(default_factory=list)
    largest: list[tuple[int, str, bytes]] = field(default_factory=list)

    def add(self, label: str, data: bytes, outcome: Outcome, slow_s: float, max_bytes: int, keep: int) -> None:
        self.tried += 1
        problems = outcome.bugs
        if outcome.seconds > slow_s:
            problems.append(f"bug:slow ({outcome.seconds * 1000:.0f} ms > {slow_s * 1000:.0f} ms)")
        if outcome.grown_bytes > max_bytes:
            problems.append(f"bug:memory ({outcome.grown_bytes / MIB:.0f} MiB > {max_bytes / MIB:.0f} MiB)")
        for call in outcome.calls:
            if call == "ok":
                self.ok += 1
            elif not call.startswith("bug:"):
                self.codes[call] += 1
        if problems:
            self.bugs.append({"label": label, "problems": [p[4:] for p in problems], "data": data,
                              "ms": round(outcome.seconds * 1000, 1), "mib": round(outcome.grown_bytes / MIB, 1)})
        self.slowest = sorted([*self.slowest, (outcome.seconds, label, data)], key=lambda x: -x[0])[:keep]
        self.largest = sorted([*self.largest, (outcome.grown_bytes, label, data)], key=lambda x: -x[0])[:keep]

    def summary(self, elapsed: float) -> str:
        codes = ", ".join(f"{code} {count}" for code, count in sorted(self.codes.items())) or "none"
        slowest = f"{self.slowest[0][0] * 1000:.0f} ms ({self.slowest[0][1]})" if self.slowest else "-"
        largest = f"{self.largest[0][0] / MIB:.1f} MiB ({self.largest[0][1]})" if self.largest else "-"
        return (f"fuzz_images: tried {self.tried} inputs in {elapsed:.0f} s; calls ok {self.ok}, rejected "
                f"{sum(self.codes.values())} ({codes}); bugs {len(self.bugs)}; slowest {slowest}; largest {largest}")


def _write_corpus(directory: Path, report: Report) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    entries: list[tuple[str, str, bytes]] = [("bug", bug["label"], bug["data"]) for bug in report.bugs]
    entries += [("slow", label, data) for _, label, data in report.slowest]
    entries += [("large", label, data) for _, label, data in report.largest]
    seen: set[str] = set()
    for kind, label, data in entries:
        digest = hashlib.sha256(data).hexdigest()[:10]
        if digest in seen:
            continue
        seen.add(digest)
        safe = "".join(c if c.isalnum() or c in "_-+" else "-" for c in label)[:80]
        path = directory / f"{kind}-{safe}-{digest}.bin"
        path.write_bytes(data)
        written.append(path)
    return written


def _watchdog(state: dict[str, Any], limit_s: float, corpus_out: Path | None) -> None:
    """A hang is a bug too: write the input being decoded and exit, rather than wait forever."""
    while True:
        time.sleep(1)
        started, label, data = state.get("started"), state.get("label"), state.get("data")
        if started is not None and time.perf_counter() - started > limit_s:
            print(f"fuzz_images: HANG: {label} still decoding after {limit_s:.0f} s", file=sys.stderr, flush=True)
            if corpus_out is not None and data is not None:
                corpus_out.mkdir(parents=True, exist_ok=True)
                (corpus_out / f"hang-{hashlib.sha256(data).hexdigest()[:10]}.bin").write_bytes(data)
            os._exit(2)


def _load_module(path: Path) -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("fuzzed_decode", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("replay", nargs="*", type=Path, help="files or folders to decode instead of fuzzing")
    parser.add_argument("--iterations", type=int, default=2000, help="mutated inputs to try (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; a run is reproducible (default 0)")
    parser.add_argument("--time-budget-s", type=float, default=170.0,
                        help="stop after this many seconds even if iterations remain (default 170)")
    parser.add_argument("--corpus-out", type=Path, help="write every bug and the slowest and largest inputs here")
    parser.add_argument("--keep", type=int, default=5, help="how many of the slowest and largest to keep (5)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the summary and every bug as JSON")
    parser.add_argument("--big-fraction", type=float, default=0.03,
                        help="share of inputs mutated from the 4096x4096 seeds (slow to decode; default 0.03)")
    parser.add_argument("--slow-s", type=float, default=2.0, help="an input slower than this is a bug (2)")
    parser.add_argument("--max-mib", type=float, default=512.0, help="an input growing RSS more is a bug (512)")
    parser.add_argument("--hang-s", type=float, default=60.0, help="abort, saving the input, after this (60)")
    parser.add_argument("--verbose", action="store_true", help="print each bug as it is found")
    parser.add_argument("--decoder", metavar="FILE", type=Path,
                        help="fuzz this copy of decode.py instead (e.g. an older revision, to see what it missed)")
    args = parser.parse_args(argv)
    if args.decoder is not None:
        global decode
        decode = _load_module(args.decoder)

    sampler = MemorySampler()
    state: dict[str, Any] = {}
    threading.Thread(target=_watchdog, args=(state, args.hang_s, args.corpus_out), daemon=True).start()
    report = Report()
    seeds = build_seeds()
    started = time.perf_counter()

    def run(label: str, data: bytes) -> None:
        state.update(started=time.perf_counter(), label=label, data=data)
        outcome = run_input(data, sampler)
        state.update(started=None)
        before = len(report.bugs)
        report.add(label, data, outcome, args.slow_s, int(args.max_mib * MIB), args.keep)
        if args.verbose and len(report.bugs) > before:
            print(f"  bug: {label}: {'; '.join(report.bugs[-1]['problems'])}", flush=True)

    if args.replay:
        files = sorted(p for path in args.replay for p in ([path] if path.is_file() else path.rglob("*"))
                       if p.is_file())
        for path in files:
            run(path.name, path.read_bytes())
    else:
        for name, data in seeds.items():  # the seeds themselves first: each must decode or be refused cleanly
            run(f"{name}+seed", data)
        big = build_big_seeds()
        for name, data in big.items():
            run(f"{name}+seed", data)
        rng = random.Random(args.seed)
        names, big_names = sorted(seeds), sorted(big)
        for iteration in range(args.iterations):
            if time.perf_counter() - started > args.time_budget_s:
                break
            if rng.random() < args.big_fraction:
                name = rng.choice(big_names)
                data, applied = mutate(rng, big[name], seeds)
            else:
                name = rng.choice(names)
                data, applied = mutate(rng, seeds[name], seeds)
            run(f"{name}+{'+'.join(applied)}+i{iteration}", data)

    elapsed = time.perf_counter() - started
    line = report.summary(elapsed)
    for bug in report.bugs[:20]:
        print(f"  bug: {bug['label']} ({bug['ms']} ms, {bug['mib']} MiB): {'; '.join(bug['problems'])}")
    if CAUSES:
        print("  rejections translated from: " + ", ".join(f"{k} {v}" for k, v in CAUSES.most_common()))
    print(line, flush=True)
    if args.corpus_out is not None:
        written = _write_corpus(args.corpus_out, report)
        print(f"fuzz_images: wrote {len(written)} inputs to {args.corpus_out}")
    if args.json is not None:
        args.json.write_text(json.dumps({
            "summary": line, "seed": args.seed, "tried": report.tried, "ok_calls": report.ok,
            "rejected": dict(report.codes), "translated_from": dict(CAUSES), "elapsed_s": round(elapsed, 1),
            "max_pixels": MAX_PIXELS,
            "bugs": [{k: v for k, v in bug.items() if k != "data"} for bug in report.bugs],
            "slowest": [{"label": label, "ms": round(s * 1000, 1)} for s, label, _ in report.slowest],
            "largest": [{"label": label, "mib": round(b / MIB, 1)} for b, label, _ in report.largest],
        }, indent=2) + "\n")
    return 1 if report.bugs else 0


if __name__ == "__main__":
    sys.exit(main())
