"""The worst inputs ``benchmarks/fuzz_images.py`` found, kept as regressions (``tests/fixtures/fuzz/``).

Every file goes through ``load_image``, ``load_mask`` and ``load_reference`` as the service calls them, and each
call must decode or raise an :class:`InputError` with a known code, within a time bound, never anything else.
:data:`EXPECTED` also pins what ``load_image`` answers for each file, with why the file is there. Files named
``*-pillow-check-first`` and the AVIF/BLP/DDS ones crashed or answered with Pillow's limit before the
allow-list and the header checks (HTTP 500, or Pillow's pixel limit in the message); the ``*-bomb`` ones took
over 2 s to decode; the ``*-slowest`` and ``*-largest-memory`` ones are the costliest that are accepted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from model.errors import ErrorCode, InputError
from model.imaging.decode import load_image, load_mask, load_reference

CORPUS = Path(__file__).resolve().parent / "fixtures" / "fuzz"
MAX_PIXELS = 16_777_216  # the service's default, as the fuzzer uses
TIME_LIMIT_S = 5.0  # generous: the slowest file decodes in under 1 s on a loaded 2-core machine

# file -> what load_image answers ("ok" or an error code)
EXPECTED = {
    "avif-libavif-runtimeerror.avif": "unsupported_format",  # was RuntimeError from libavif: a 500
    "blp-unknown-compression-blpformaterror.blp": "unsupported_format",  # was BLPFormatError (NotImplementedError)
    "blp-unknown-encoding-blpformaterror.blp": "unsupported_format",
    "dds-unknown-pixel-format-notimplementederror.dds": "unsupported_format",  # was NotImplementedError
    "tiff-mutated-pillow-check-first.tif": "unsupported_format",  # TIFF is refused by its signature
    "eps-header-only.eps": "unsupported_format",  # was handed to Ghostscript
    "svg-with-xml-prolog.svg": "unsupported_format",
    "pdf-one-page.pdf": "unsupported_format",
    "bmp-rle8-mutated.bmp": "unsupported_format",  # RLE BMP: decoded pixel by pixel in Python
    "bmp-rle8-4096-end-of-line-bomb.bmp": "unsupported_format",  # 17 KB, took 2.3 s
    "jpeg-progressive-2048-1000-scans-bomb.jpg": "unsupported_format",  # 56 KB, took 2.6 s (1,000 scans)
    # Header sizes over the limit that Pillow's own bomb check refused first, citing its limit, not ours.
    "bmp-header-bomb-pillow-check-first.bmp": "too_many_pixels",  # an unsigned 0xFFFFFFFF width
    "gif-header-bomb-pillow-check-first.gif": "too_many_pixels",
    "gif-first-frame-65535x65535-beyond-screen.gif": "too_many_pixels",  # the frame grows the canvas
    "jpeg-sof-bomb-pillow-check-first.jpg": "too_many_pixels",
    "png-ihdr-0xffffffff-square.png": "too_many_pixels",
    "webp-canvas-bomb-pillow-check-first.webp": "too_many_pixels",
    "webp-vp8x-canvas-16384x16384.webp": "too_many_pixels",  # libwebp allocates the canvas on open
    "gif-signature-without-frame.gif": "not_an_image",
    # The costliest accepted inputs: near the pixel limit, a few hundred MiB and under a second.
    "gif-interlaced-65535x256-slow.gif": "ok",
    "webp-anim-4096-largest-memory.webp": "ok",
    "webp-lossless-4096-duplicated-chunk-slowest.webp": "ok",
}
FILES = sorted(path.name for path in CORPUS.iterdir() if path.is_file())

CALLS: dict[str, tuple[Callable[[bytes], Any], tuple[str, ...]]] = {
    "load_image": (lambda data: load_image(data, field="background", max_pixels=MAX_PIXELS), ("background",)),
    "load_mask": (lambda data: load_mask(data, field="background_mask", size=None, max_pixels=MAX_PIXELS),
                  ("background_mask",)),
    "load_reference": (lambda data: load_reference(data, max_pixels=MAX_PIXELS), ("reference", "reference_mask")),
}


def test_every_corpus_file_is_described() -> None:
    assert FILES, f"no corpus files in {CORPUS}"
    assert set(FILES) == set(EXPECTED)
    assert sum((CORPUS / name).stat().st_size for name in FILES) < 200_000


def outcome(call: Callable[[bytes], Any], data: bytes, fields: tuple[str, ...]) -> str:
    started = time.perf_counter()
    try:
        call(data)
        result = "ok"
    except InputError as exc:
        assert isinstance(exc.code, ErrorCode)
        assert exc.field in fields
        result = exc.code.value
    # Any other exception propagates and fails the test: that is the bug this corpus guards against.
    elapsed = time.perf_counter() - started
    assert elapsed < TIME_LIMIT_S, f"took {elapsed:.1f} s"
    return result


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about some damaged metadata; that is fine
@pytest.mark.parametrize("name", FILES)
def test_corpus_file_decodes_or_is_refused(name: str) -> None:
    data = (CORPUS / name).read_bytes()
    results = {call: outcome(fn, data, fields) for call, (fn, fields) in CALLS.items()}
    assert results["load_image"] == EXPECTED[name]
    for result in results.values():
        assert result == "ok" or result in {code.value for code in ErrorCode}
