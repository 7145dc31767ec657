"""Image and mask decoding: formats, modes, orientation, and every bad-input rejection with its code and field."""

from __future__ import annotations

import io
import struct
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from model.errors import ErrorCode, InputError
from model.imaging.decode import (
    ACCEPTED_FORMATS,
    DEFAULT_MAX_PIXELS,
    MAX_GIF_BLOCKS,
    MAX_JPEG_SCANS,
    MAX_JPEG_SEGMENTS,
    MAX_JUNK_BYTES,
    MAX_PNG_CHUNKS,
    load_image,
    load_mask,
    load_reference,
    mask_from_arrays,
)
from model.spec.limits import Limits

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (30, 40, 3), dtype=np.uint8)
YY, XX = np.mgrid[:30, :40]
DISC = (YY - 15) ** 2 + (XX - 20) ** 2 <= 10**2  # 317 pixels


def encode(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header announces ``width`` x ``height`` but that carries no pixel data at all."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def rejected(call, *args, **kwargs) -> InputError:
    with pytest.raises(InputError) as excinfo:
        call(*args, **kwargs)
    assert isinstance(excinfo.value.code, ErrorCode)
    return excinfo.value


# ---------------------------------------------------------------------------------------------------- images


FEW_COLOURS = (RGB // 64 * 64).astype(np.uint8)  # 64 colours: a GIF's palette holds them exactly


@pytest.mark.parametrize("fmt, lossless", [("PNG", True), ("WEBP", True), ("JPEG", False), ("GIF", True),
                                           ("BMP", True)])
def test_formats_decode_to_rgb_uint8(fmt: str, lossless: bool) -> None:
    assert fmt in ACCEPTED_FORMATS
    options = {"lossless": True} if fmt == "WEBP" else {}
    source = FEW_COLOURS if fmt == "GIF" else RGB
    image = load_image(encode(Image.fromarray(source), fmt, **options), field="background")
    assert image.shape == (30, 40, 3) and image.dtype == np.uint8
    if lossless:
        np.testing.assert_array_equal(image, source)


@pytest.mark.parametrize("fmt", ["WEBP", "GIF", "PNG"])
def test_alpha_formats_give_the_reference_mask(fmt: str) -> None:
    rgba = np.dstack([FEW_COLOURS, DISC.astype(np.uint8) * 255])
    image = Image.fromarray(rgba, "RGBA")
    options: dict[str, object] = {"lossless": True, "exact": True} if fmt == "WEBP" else {}
    if fmt == "GIF":  # one palette index is the transparent one
        image = image.convert("P")
        options = {"transparency": int(np.asarray(image)[0, 0])}
    rgb, mask = load_reference(encode(image, fmt, **options))
    np.testing.assert_array_equal(mask, DISC)
    if fmt != "GIF":
        np.testing.assert_array_equal(rgb, FEW_COLOURS)


def test_top_down_and_one_bit_bmp() -> None:
    data = bytearray(encode(Image.fromarray(RGB), "BMP"))
    data[22:26] = struct.pack("<i", -30)  # a negative height: the same rows stored top to bottom
    np.testing.assert_array_equal(load_image(bytes(data), field="background"), RGB[::-1])
    mask = load_mask(encode(Image.fromarray(DISC).convert("1"), "BMP"), field="m", size=(30, 40))
    np.testing.assert_array_equal(mask, DISC)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animations_decode_their_first_frame_only(fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    frames = [Image.new("RGB", (40, 30), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    options = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=40, **options)
    plugin = type(Image.open(io.BytesIO(data)))
    for name in ("n_frames", "is_animated"):
        if isinstance(getattr(plugin, name, None), property):  # GIF: counting frames walks the whole file
            monkeypatch.setattr(plugin, name, property(lambda self: pytest.fail("the frames were counted")))
    image = load_image(data, field="background")
    assert image.shape == (30, 40, 3)
    assert (image == (255, 0, 0)).all()


def test_a_huge_frame_count_costs_nothing() -> None:
    frames = [Image.new("RGB", (64, 64), colour) for colour in ((255, 0, 0), (0, 255, 0))]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    second = gif.index(b"!\xf9", gif.index(b",") + 1)  # the second frame's control block, up to the trailer
    data = gif[:second] + gif[second:-1] * 100_000 + b";"  # 100,001 frames, ~14 MB
    started = time.perf_counter()
    assert (load_image(data, field="background") == (255, 0, 0)).all()
    assert time.perf_counter() - started < 1.0


def test_paths_pil_images_and_arrays_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "image.png"
    path.write_bytes(encode(Image.fromarray(RGB)))
    for source in (path, str(path), Image.open(path), RGB, bytearray(path.read_bytes())):
        np.testing.assert_array_equal(load_image(source, field="background"), RGB)


def test_missing_file_is_rejected(tmp_path: Path) -> None:
    error = rejected(load_image, tmp_path / "nope.png", field="background")
    assert (error.field, error.code) == ("background", "unreadable_file")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_is_applied(fmt: str) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image must be rotated 90 degrees clockwise for display
    data = encode(Image.fromarray(RGB), fmt, exif=exif.tobytes())
    image = load_image(data, field="background")
    assert image.shape == (40, 30, 3)
    if fmt == "PNG":
        np.testing.assert_array_equal(image, np.rot90(RGB, k=-1))


def test_exif_orientation_applies_to_masks_too() -> None:
    exif = Image.Exif()
    exif[0x0112] = 8
    data = encode(Image.fromarray(DISC.astype(np.uint8) * 255), "PNG", exif=exif.tobytes())
    np.testing.assert_array_equal(load_mask(data, field="background_mask", size=(40, 30)), np.rot90(DISC))


def test_palette_image() -> None:
    palette = Image.fromarray(RGB).quantize(16)
    image = load_image(encode(palette), field="background")
    np.testing.assert_array_equal(image, np.asarray(palette.convert("RGB")))


def test_greyscale_l_and_la() -> None:
    grey = RGB[..., 0]
    image = load_image(encode(Image.fromarray(grey, "L")), field="background")
    np.testing.assert_array_equal(image, np.repeat(grey[..., None], 3, axis=2))
    la = Image.fromarray(np.stack([grey, DISC.astype(np.uint8) * 255], -1), "LA")
    np.testing.assert_array_equal(load_image(encode(la), field="background"), image)


def test_sixteen_bit_greyscale_is_scaled() -> None:
    values = (np.arange(30 * 40).reshape(30, 40) * 54).astype(np.uint16)  # up to 64746
    data = encode(Image.fromarray(values))
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    image = load_image(data, field="background")
    np.testing.assert_array_equal(image[..., 0], np.rint(values / 257).astype(np.uint8))
    assert image[..., 0].max() == 252


def test_thirty_two_bit_integer_image() -> None:
    values = (np.arange(30 * 40).reshape(30, 40) * 54).astype(np.int32)
    image = Image.fromarray(values)  # mode I: a Pillow image given directly (no accepted file format holds it)
    assert image.mode == "I"
    np.testing.assert_array_equal(load_image(image, field="background")[..., 1], np.rint(values / 257))


def test_cmyk_image() -> None:
    cmyk = Image.fromarray(RGB).convert("CMYK")
    image = load_image(encode(cmyk, "JPEG", quality=100), field="background")
    assert image.shape == (30, 40, 3)
    assert np.abs(image.astype(int) - RGB).mean() < 8  # a JPEG round trip of the same colours


@pytest.mark.parametrize("mode", ["LAB", "HSV", "YCbCr", "RGBX", "La", "RGBa", "PA", "I;16B", "F", "1"])
def test_other_pillow_modes(mode: str) -> None:
    image = load_image(Image.new(mode, (5, 4)), field="background")
    assert image.shape == (4, 5, 3) and image.dtype == np.uint8


def test_alpha_is_dropped_without_compositing() -> None:
    rgba = np.dstack([RGB, np.zeros((30, 40), np.uint8)])
    np.testing.assert_array_equal(load_image(encode(Image.fromarray(rgba, "RGBA")), field="background"), RGB)


@pytest.mark.parametrize("data", [b"", b"hello world", b"\x00" * 100, b"BMW is not a bitmap", b"<html></html>",
                                  b"RIFF\x24\x00\x00\x00WAVEfmt ", b"GIF89a", b"\x89PNG\r\n\x1a\n"])
def test_not_an_image(data: bytes) -> None:
    error = rejected(load_image, data, field="background")
    assert (error.field, error.code) == ("background", "not_an_image")
    if data:
        assert "PNG, JPEG, WebP, GIF, BMP" in error.message or "starts like a" in error.message


def _pillow_file(fmt: str, image: Image.Image | None = None) -> bytes:
    try:
        return encode(image or Image.fromarray(RGB), fmt)
    except (KeyError, OSError) as exc:  # a codec this Pillow build lacks
        pytest.skip(f"Pillow cannot write {fmt}: {exc}")


REFUSED = {
    "EPS": lambda: _pillow_file("EPS"),
    "EPS header": lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 40 30\n",
    "PostScript": lambda: b"%!PS\n/Times-Roman findfont\n",
    "PDF": lambda: _pillow_file("PDF"),
    "SVG": lambda: b"<svg xmlns='http://www.w3.org/2000/svg'/>",
    "SVG document": lambda: b'\xef\xbb\xbf<?xml version="1.0"?>\n<!-- a drawing -->\n<svg width="4" height="4"></svg>',
    "TIFF": lambda: _pillow_file("TIFF"),
    "AVIF": lambda: _pillow_file("AVIF"),
    "JPEG 2000": lambda: _pillow_file("JPEG2000"),
    "DDS": lambda: _pillow_file("DDS"),
    "BLP": lambda: b"BLP2" + bytes(148),
    "ICNS": lambda: _pillow_file("ICNS"),
    "ICO": lambda: _pillow_file("ICO"),
    "PSD": lambda: b"8BPS\x00\x01" + bytes(32),
    "QOI": lambda: _pillow_file("QOI"),
    "PCX": lambda: _pillow_file("PCX"),
    "Netpbm": lambda: _pillow_file("PPM"),
    "HEIC": lambda: b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic",
}


@pytest.mark.parametrize("name", REFUSED)
def test_refused_formats_are_unsupported_format(name: str) -> None:
    error = rejected(load_image, REFUSED[name](), field="reference_mask")
    assert (error.field, error.code) == ("reference_mask", "unsupported_format")
    assert name.split()[0] in error.message  # the format is named
    assert "accepted formats: PNG, JPEG, WebP, GIF, BMP" in error.message
    assert str(error).startswith("reference_mask: ")


def test_eps_never_reaches_ghostscript(monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import EpsImagePlugin

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: pytest.fail("Ghostscript was called"))
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: pytest.fail("the EPS plugin ran"))
    assert rejected(load_image, _pillow_file("EPS"), field="background").code == "unsupported_format"


def test_spider_has_no_signature_and_is_not_an_image() -> None:
    # SPIDER is recognised by Pillow from float values, not a signature: it is not an image we know of at all.
    data = _pillow_file("SPIDER", Image.fromarray(RGB[..., 0]).convert("F"))
    assert rejected(load_image, data, field="background").code == "not_an_image"


def test_only_the_recognised_plugin_may_open_the_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []
    real_open = Image.open

    def spy(fp: object, mode: str = "r", formats: object = None) -> Image.Image:
        calls.append(formats)
        return real_open(fp, mode, formats)  # type: ignore[arg-type]

    monkeypatch.setattr(Image, "open", spy)
    load_image(encode(Image.fromarray(RGB), "WEBP"), field="background")
    assert calls == [["WEBP"]]


def test_rle_bmp_is_refused() -> None:
    palette = bytes(4 * 256)
    body = b"\x28\x07\x00\x00" * 30 + b"\x00\x01"  # 40 pixels of index 7 then end-of-line, per row
    info = struct.pack("<IiiHHIIiiII", 40, 40, 30, 1, 8, 1, len(body), 0, 0, 256, 0)
    offset = 14 + len(info) + len(palette)
    data = b"BM" + struct.pack("<IHHI", offset + len(body), 0, 0, offset) + info + palette + body
    error = rejected(load_image, data, field="background")
    assert error.code == "unsupported_format" and "RLE8" in error.message


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_truncated_image(fmt: str) -> None:
    data = encode(Image.fromarray(RGB), fmt)
    error = rejected(load_image, data[: len(data) // 2], field="reference")
    assert (error.field, error.code) == ("reference", "truncated_image")


def test_truncated_image_even_if_pillow_was_told_to_accept_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = encode(Image.fromarray(RGB), "JPEG")
    error = rejected(load_image, data[: len(data) // 2], field="background")
    assert error.code == "truncated_image"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_corrupt_png_data_is_rejected() -> None:
    data = bytearray(encode(Image.fromarray(RGB)))
    start = data.index(b"IDAT") + 20
    data[start : start + 40] = bytes(40)
    assert rejected(load_image, bytes(data), field="background").code == "truncated_image"


@pytest.mark.parametrize("width, height", [(9_000, 9_000), (12_000, 10_000), (20_000, 20_000)])
def test_too_many_pixels_is_checked_before_decoding(width: int, height: int) -> None:
    # The file has no pixel data: decoding it would report a truncated image, so this proves the order. The
    # sizes are below, between and above Pillow's warning and error: ours is checked first, so neither fires.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        error = rejected(load_image, png_header_only(width, height), field="background")
    assert (error.field, error.code) == ("background", "too_many_pixels")
    assert f"{width}x{height}" in error.message
    assert f"at most {DEFAULT_MAX_PIXELS} pixels" in error.message
    assert not isinstance(error.__cause__, (Image.DecompressionBombError, Image.DecompressionBombWarning))


def test_bomb_messages_cite_the_services_limit() -> None:
    for data in (png_header_only(20_000, 20_000), png_header_only(100, 100)):
        error = rejected(load_image, data, field="background", max_pixels=5_000)
        assert error.code == "too_many_pixels"
        assert "at most 5000 pixels" in error.message
        assert str(Image.MAX_IMAGE_PIXELS) not in error.message and "DOS" not in error.message


def _webp_canvas(width: int, height: int) -> bytes:
    """A WebP whose extended header announces a ``width`` x ``height`` canvas (libwebp allocates it on open)."""
    payload = encode(Image.new("RGB", (8, 8)), "WEBP", lossless=True)[12:]
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes(4) + (width - 1).to_bytes(3, "little")
    vp8x += (height - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", 4 + len(vp8x) + len(payload)) + b"WEBP" + vp8x + payload


@pytest.mark.parametrize("data, size", [
    (lambda: _webp_canvas(16_384, 16_384), "16384x16384"),
    (lambda: b"GIF89a\x10\x00\x10\x00\x00\x00\x00,\x00\x00\x00\x00\xff\xff\xff\xff\x00\x02\x02D\x01\x00;",
     "65535x65535"),  # a first frame far larger than the GIF's screen: Pillow grows the canvas to hold it
    (lambda: b"BM" + bytes(12) + struct.pack("<IIIHH", 40, 0xFFFFFFFF, 2, 1, 24) + bytes(24), "4294967295x2"),
], ids=["webp-canvas", "gif-frame", "bmp-unsigned-width"])
def test_header_sizes_are_read_as_pillow_reads_them(data, size: str) -> None:
    error = rejected(load_image, data(), field="background", max_pixels=10_000)
    assert error.code == "too_many_pixels" and size in error.message and "at most 10000 pixels" in error.message


def test_header_beyond_pillows_bomb_limit() -> None:
    error = rejected(load_image, png_header_only(20_000, 20_000), field="background", max_pixels=10**10)
    assert (error.field, error.code) == ("background", "too_many_pixels")


def test_max_pixels_is_configurable() -> None:
    data = encode(Image.fromarray(RGB))
    assert rejected(load_image, data, field="background", max_pixels=30 * 40 - 1).code == "too_many_pixels"
    assert load_image(data, field="background", max_pixels=30 * 40).shape == (30, 40, 3)
    assert rejected(load_image, RGB, field="background", max_pixels=100).code == "too_many_pixels"
    assert DEFAULT_MAX_PIXELS == Limits().max_pixels  # the same default on every surface


def test_pillow_decompression_bomb_error_is_mapped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow errors above twice this
    data = encode(Image.fromarray(RGB))
    error = rejected(load_image, data, field="reference", max_pixels=10**9)
    assert (error.field, error.code) == ("reference", "too_many_pixels")
    assert "1000000000 pixels" in error.message and "DOS" not in error.message  # ours, never Pillow's text
    # Where our limit is the lower one, ours decides first and the message has the size.
    error = rejected(load_image, data, field="reference", max_pixels=500)
    assert "40x30 (1200 pixels); at most 500 pixels" in error.message


def test_pillow_decompression_bomb_warning_as_error_is_mapped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1200 pixels: above Pillow's warning, below its error
    data = encode(Image.fromarray(RGB))
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        error = rejected(load_image, data, field="background", max_pixels=10**9)
    assert (error.field, error.code) == ("background", "too_many_pixels")
    with pytest.warns(Image.DecompressionBombWarning):  # a plain warning: our own limit decides
        assert load_image(data, field="background", max_pixels=10**9).shape == (30, 40, 3)


def test_jpeg_with_too_many_scans_is_refused_before_decoding() -> None:
    data = encode(Image.fromarray(RGB), "JPEG", progressive=True)
    last_scan = data.rindex(b"\xff\xda")
    tables = data.rfind(b"\xff\xc4", 0, last_scan)  # the Huffman table the last scan needs, with it
    scan = data[tables if tables > data.rfind(b"\xff\xda", 0, last_scan) else last_scan : -2]
    assert load_image(data[:-2] + scan * 20 + b"\xff\xd9", field="background").shape == (30, 40, 3)
    error = rejected(load_image, data[:-2] + scan * (MAX_JPEG_SCANS + 1) + b"\xff\xd9", field="background")
    assert error.code == "unsupported_format" and f"more than {MAX_JPEG_SCANS} scans" in error.message


def test_png_with_too_many_chunks_is_refused() -> None:
    data = encode(Image.fromarray(RGB))
    filler = struct.pack(">I", 0) + b"zzZz" + struct.pack(">I", zlib.crc32(b"zzZz"))  # an empty private chunk
    assert load_image(data[:33] + filler * 1_000 + data[33:], field="background").shape == (30, 40, 3)
    error = rejected(load_image, data[:33] + filler * MAX_PNG_CHUNKS + data[33:], field="background")
    assert error.code == "unsupported_format" and "chunks" in error.message


@pytest.mark.parametrize("case", ["jpeg-segments", "jpeg-fill", "gif-blocks", "gif-junk"])
def test_per_segment_costs_are_bounded(case: str) -> None:
    jpeg, gif = encode(Image.fromarray(RGB), "JPEG"), encode(Image.fromarray(FEW_COLOURS), "GIF")
    frame = gif.index(b",")
    data = {
        "jpeg-segments": jpeg[:2] + b"\xff\xfe\x00\x02" * (MAX_JPEG_SEGMENTS + 1) + jpeg[2:],  # empty comments
        "jpeg-fill": jpeg[:2] + b"\xff" * (MAX_JUNK_BYTES + 2) + jpeg[2:],
        "gif-blocks": gif[:frame] + b"!\xfe" + b"\x01a" * (MAX_GIF_BLOCKS + 1) + b"\x00" + gif[frame:],
        "gif-junk": gif[:frame] + b"\x00" * (MAX_JUNK_BYTES + 1) + gif[frame:],
    }[case]
    started = time.perf_counter()
    assert rejected(load_image, data, field="background").code == "unsupported_format"
    assert time.perf_counter() - started < 1.0


# Exceptions outside what the old decoder caught (OSError, SyntaxError, ValueError, EOFError, IndexError, zlib.error)
# that plugins were seen to raise on mutated input (BLP, DDS, AVIF, SPIDER) or could.
DECODER_EXCEPTIONS = [struct.error("unpack requires a buffer of 4 bytes"), TypeError("bad operand"), KeyError(3),
                      MemoryError(), RuntimeError("Failed to decode frame 0"), NotImplementedError("Unknown flags"),
                      OverflowError("Python int too large"), ZeroDivisionError("division by zero"),
                      RecursionError("maximum recursion depth exceeded"), AssertionError(), UserWarning("corrupt")]


@pytest.mark.parametrize("exc", DECODER_EXCEPTIONS, ids=lambda exc: type(exc).__name__)
@pytest.mark.parametrize("stage", ["open", "load", "convert", "transpose"])
def test_any_decoder_exception_becomes_an_input_error(monkeypatch: pytest.MonkeyPatch, exc: Exception,
                                                      stage: str) -> None:
    from PIL import PngImagePlugin

    def boom(*args: object, **kwargs: object) -> None:
        raise exc

    exif = Image.Exif()
    exif[0x0112] = 3
    data = encode(Image.fromarray(RGB).convert("P"), exif=exif.tobytes())
    target = {"open": (PngImagePlugin.PngImageFile, "_open"), "load": (PngImagePlugin.PngImageFile, "load"),
              "convert": (Image.Image, "convert"), "transpose": (Image.Image, "transpose")}[stage]
    monkeypatch.setattr(*target, boom)
    for call in (lambda: load_image(data, field="background"),
                 lambda: load_mask(data, field="background_mask", size=None), lambda: load_reference(data)):
        with pytest.raises(InputError) as info:
            call()
        assert info.value.code in (ErrorCode.TRUNCATED_IMAGE, ErrorCode.NOT_AN_IMAGE)
        assert info.value.field in ("background", "background_mask", "reference")


def test_malformed_exif_keeps_the_image_as_stored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image.Image, "getexif", lambda self: (_ for _ in ()).throw(struct.error("bad IFD")))
    np.testing.assert_array_equal(load_image(encode(Image.fromarray(RGB)), field="background"), RGB)


def test_bad_arrays_are_rejected() -> None:
    assert rejected(load_image, np.zeros((4, 4, 2), np.uint8), field="x").code == "not_an_image"
    assert rejected(load_image, np.full((4, 4, 3), 2.0), field="x").code == "not_an_image"
    assert rejected(load_image, np.zeros((0, 4, 3), np.uint8), field="x").code == "not_an_image"
    assert rejected(load_image, [[1, 2]], field="x").code == "not_an_image"


# ----------------------------------------------------------------------------------------------------- masks


def test_l_mask_threshold_is_above_128() -> None:
    values = np.array([[0, 128, 129, 255]], np.uint8)
    mask = load_mask(encode(Image.fromarray(values, "L")), field="background_mask", size=(1, 4))
    assert mask.tolist() == [[False, False, True, True]]


def test_one_bit_mask() -> None:
    data = encode(Image.fromarray(DISC).convert("1"))
    assert Image.open(io.BytesIO(data)).mode == "1"
    np.testing.assert_array_equal(load_mask(data, field="background_mask", size=(30, 40)), DISC)


def test_rgb_mask_uses_any_channel() -> None:
    red = np.zeros((30, 40, 3), np.uint8)
    red[DISC] = (255, 0, 0)  # luminance 76: a luminance rule would see nothing
    np.testing.assert_array_equal(load_mask(encode(Image.fromarray(red)), field="m", size=(30, 40)), DISC)
    white = np.repeat(DISC[..., None].astype(np.uint8) * 255, 3, axis=2)
    np.testing.assert_array_equal(load_mask(encode(Image.fromarray(white), "JPEG"), field="m", size=None), DISC)


def test_rgba_mask_uses_alpha_when_it_is_not_opaque() -> None:
    rgba = np.zeros((30, 40, 4), np.uint8)
    rgba[..., 3] = DISC * 255  # a black stroke on a transparent layer
    np.testing.assert_array_equal(load_mask(encode(Image.fromarray(rgba, "RGBA")), field="m", size=None), DISC)


def test_opaque_rgba_mask_uses_colour() -> None:
    rgba = np.full((30, 40, 4), 255, np.uint8)
    rgba[..., :3] = DISC[..., None] * 255
    np.testing.assert_array_equal(load_mask(encode(Image.fromarray(rgba, "RGBA")), field="m", size=None), DISC)


def test_palette_mask() -> None:
    palette = Image.fromarray(DISC.astype(np.uint8) * 255, "L").convert("P")
    assert palette.mode == "P"
    np.testing.assert_array_equal(load_mask(encode(palette), field="m", size=(30, 40)), DISC)


def test_sixteen_bit_mask() -> None:
    data = encode(Image.fromarray(DISC.astype(np.uint16) * 65535))
    np.testing.assert_array_equal(load_mask(data, field="m", size=(30, 40)), DISC)


@pytest.mark.parametrize(
    "array",
    [DISC, DISC.astype(np.uint8), DISC.astype(np.int64), DISC.astype(np.uint8) * 255, DISC.astype(np.float32)],
    ids=["bool", "uint8_01", "int64_01", "uint8_255", "float01"],
)
def test_mask_arrays(array: np.ndarray) -> None:
    np.testing.assert_array_equal(load_mask(array, field="m", size=(30, 40)), DISC)


def test_mask_size_mismatch_names_the_field_and_both_sizes() -> None:
    data = encode(Image.fromarray(DISC[:, :35]))
    error = rejected(load_mask, data, field="background_mask", size=(30, 40))
    assert (error.field, error.code) == ("background_mask", "size_mismatch")
    assert "35x30" in error.message and "40x30" in error.message


def test_empty_mask() -> None:
    error = rejected(load_mask, encode(Image.new("L", (40, 30))), field="background_mask", size=(30, 40))
    assert (error.field, error.code) == ("background_mask", "empty_mask")


def test_mask_not_an_image() -> None:
    error = rejected(load_mask, b"GIF89a nonsense", field="reference_mask", size=None)
    assert (error.field, error.code) == ("reference_mask", "not_an_image")


def test_mask_from_arrays_rule() -> None:
    color = np.array([[0, 200]], np.uint8)
    assert mask_from_arrays(color, None).tolist() == [[False, True]]
    assert mask_from_arrays(color, np.array([[255, 255]], np.uint8)).tolist() == [[False, True]]
    assert mask_from_arrays(color, np.array([[255, 0]], np.uint8)).tolist() == [[True, False]]


# ------------------------------------------------------------------------------------------------- reference


def rgba_bytes(alpha: np.ndarray) -> bytes:
    return encode(Image.fromarray(np.dstack([RGB, alpha.astype(np.uint8)]), "RGBA"))


def test_reference_alpha_is_the_mask() -> None:
    alpha = np.where(DISC, 200, 100)
    rgb, mask = load_reference(rgba_bytes(alpha))
    np.testing.assert_array_equal(rgb, RGB)
    np.testing.assert_array_equal(mask, DISC)


def test_reference_case_files_match_the_readme_reading(case) -> None:
    rgb, mask = load_reference(case.dir / "reference.png")
    rgba = np.asarray(Image.open(case.dir / "reference.png").convert("RGBA"))
    np.testing.assert_array_equal(rgb, rgba[..., :3])
    np.testing.assert_array_equal(mask, rgba[..., 3] > 128)
    background = load_image(case.dir / "background.png", field="background")
    target = load_mask(case.dir / "background_mask.png", field="background_mask", size=background.shape[:2])
    np.testing.assert_array_equal(target, np.asarray(Image.open(case.dir / "background_mask.png")) > 128)


def test_reference_palette_transparency_is_the_mask() -> None:
    palette = Image.fromarray(np.where(DISC[..., None], RGB, 0).astype(np.uint8)).quantize(32)
    index = np.asarray(palette)
    transparent = int(index[0, 0])  # the colour of the (black) outside
    _, mask = load_reference(encode(palette, transparency=transparent))
    np.testing.assert_array_equal(mask, index != transparent)


def test_reference_with_explicit_mask() -> None:
    rgb, mask = load_reference(encode(Image.fromarray(RGB)), encode(Image.fromarray(DISC)))
    np.testing.assert_array_equal(rgb, RGB)
    np.testing.assert_array_equal(mask, DISC)


def test_explicit_mask_overrides_alpha() -> None:
    _, mask = load_reference(rgba_bytes(np.full((30, 40), 255)), DISC)
    np.testing.assert_array_equal(mask, DISC)


def test_reference_with_no_object_in_alpha() -> None:
    error = rejected(load_reference, rgba_bytes(np.zeros((30, 40))))
    assert (error.field, error.code) == ("reference", "empty_mask")


def test_reference_with_no_object_in_mask() -> None:
    error = rejected(load_reference, encode(Image.fromarray(RGB)), np.zeros((30, 40), bool))
    assert (error.field, error.code) == ("reference_mask", "empty_mask")


def test_reference_without_alpha_or_mask() -> None:
    error = rejected(load_reference, encode(Image.fromarray(RGB)))
    assert (error.field, error.code) == ("reference_mask", "missing_mask")


def test_reference_mask_size_mismatch() -> None:
    error = rejected(load_reference, encode(Image.fromarray(RGB)), encode(Image.fromarray(DISC[:20])))
    assert (error.field, error.code) == ("reference_mask", "size_mismatch")
    assert "40x20" in error.message and "40x30" in error.message


@pytest.mark.parametrize("pixels", [1, 2, 3])
def test_tiny_reference_object_is_rejected(pixels: int) -> None:
    alpha = np.zeros((30, 40))
    alpha[10, 10 : 10 + pixels] = 255
    error = rejected(load_reference, rgba_bytes(alpha))
    assert (error.field, error.code) == ("reference", "mask_too_small")
    tiny = alpha > 0
    error = rejected(load_reference, encode(Image.fromarray(RGB)), tiny)
    assert (error.field, error.code) == ("reference_mask", "mask_too_small")


def test_reference_decoding_errors_name_the_reference() -> None:
    assert rejected(load_reference, b"not an image").field == "reference"
    assert rejected(load_reference, png_header_only(9_000, 9_000), max_pixels=1000).code == "too_many_pixels"
