"""Robust decoding of user images and masks into the arrays the pipeline works on.

Accepts encoded bytes, file paths, Pillow images and numpy arrays. Encoded data (bytes and files) must be one of
the :data:`ACCEPTED_FORMATS`: **PNG** (APNG: first frame), **JPEG** (MPO: first image), **WebP** (animated: first
frame), **GIF** (first frame) and **BMP** (uncompressed or bit-fields; not RLE). The format is recognised from the
bytes themselves (magic numbers, never a file name or a content type) before Pillow sees them, and Pillow is then
told to use that one plugin only. Pillow images and arrays given directly (Python API) skip that check.

Every failure a user can cause becomes an :class:`~model.errors.InputError` (status 422) naming the field, and no
other exception escapes a decoder (whatever Pillow or a C library raises while opening, loading, converting or
rotating is mapped to one of these codes):

* ``not_an_image``        no image is recognised in the data: no known image signature, or the signature of an
  accepted format not followed by a header of that format (also a Python object that is not an image at all);
* ``unsupported_format``  the data is an image in a format that is not accepted (EPS, PDF, SVG, TIFF, AVIF, ...:
  the message names it and lists the accepted ones), or a refused variant of an accepted format (RLE BMP, a JPEG
  with more scans or segments than any real encoder writes, a PNG with a compressed-metadata bomb);
* ``truncated_image``     an accepted format whose header was recognised but whose header fields or pixel data are
  cut short or corrupt (never silently padded);
* ``too_many_pixels``     the header announces more than ``max_pixels`` pixels: rejected *before* decoding, which is
  also the defence against decompression bombs; the message gives the size and this limit;
* ``size_mismatch``       a mask whose size differs from its image;
* ``empty_mask`` / ``mask_too_small`` / ``missing_mask`` for masks without a usable object.

Conventions: images come back as (H, W, 3) uint8 RGB with the EXIF orientation applied; masks as (H, W) bool.
Sizes passed as ``size`` are ``(height, width)``, the order of ``array.shape[:2]``; messages say ``WIDTHxHEIGHT``.
"""

from __future__ import annotations

import io
import re
import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from model.errors import ErrorCode, InputError
from model.imaging.preprocess import MIN_MASK_PIXELS
from model.spec.limits import Limits

# A truncated upload must be an error, not an image with a grey bottom half.
ImageFile.LOAD_TRUNCATED_IMAGES = False

DEFAULT_MAX_PIXELS = Limits().max_pixels  # the one default of every surface (model.spec.limits)
"""Largest accepted image, in pixels (a 48 MP phone photo fits; ~150 MB as RGB)."""
MASK_THRESHOLD = 128
"""A mask pixel is inside when its 8-bit value is above this (upstream's ``> 128``)."""

ImageSource = bytes | bytearray | memoryview | str | Path | Image.Image | np.ndarray

# The allow-list: Pillow's plugin name -> the name messages use. Why these and only these:
# * PNG, JPEG, WebP: what phones, cameras, browsers and editors produce; their decoders (zlib, libjpeg-turbo,
#   libwebp) are among the most fuzzed code there is (OSS-Fuzz), and the pre-checks below bound their cost.
# * GIF: still common for cut-outs and stickers with transparency; Pillow's LZW decoder is small C, OSS-Fuzzed;
#   only the first frame is decoded and the frame count is never walked.
# * BMP: Windows screenshots and clipboard exports; uncompressed rows are a plain copy in C. Its RLE4/RLE8
#   variants are refused: Pillow decodes them in pure Python, pixel by pixel (a 17 KB RLE8 file announcing
#   4096x4096 takes 1.5 s), and no current software writes them.
# Refused (unsupported_format) although Pillow could read some: EPS/PostScript (hands the file to Ghostscript, a
# full interpreter with a long record of sandbox escapes), PDF and SVG (documents, not rasters; Pillow cannot read
# them), TIFF (libtiff with a dozen codecs, multi-page IFD chains, and Pillow's own TiffDecode CVEs such as
# CVE-2020-35654, CVE-2021-25289 and CVE-2021-25291; 16-bit input is served by PNG), and the rarely used formats
# whose plugins raise unexpected errors on mutated input (AVIF/HEIF, JPEG 2000, DDS, BLP, ICNS, ICO, PSD, SPIDER,
# ...). Adding a format means a signature in _accepted_format, a header reader in _HEADER_READERS and seeds in
# benchmarks/fuzz_images.py, then a fuzzing run.
ACCEPTED_FORMATS: dict[str, str] = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WebP", "GIF": "GIF", "BMP": "BMP"}
_ACCEPTED_TEXT = ", ".join(ACCEPTED_FORMATS.values())

# Structural bounds on the accepted formats. Each is far above what any encoder writes, and each caps a loop that
# Pillow runs in Python (per chunk, per segment or per byte) or a decoder cost that multiplies the pixel count,
# so a small upload cannot buy seconds of CPU (benchmarks/fuzz_images.py flags anything over 2 s).
MAX_PNG_CHUNKS = 65_536
"""PNG chunks in a file (libpng writes one IDAT per 8 KiB: a 20 MiB PNG has ~2,600 chunks)."""
MAX_JPEG_SEGMENTS = 1_024
"""Marker segments in a JPEG's main image (real files: 10-40 before the first scan, a table or two per further
scan, one per 64 KiB of a split ICC profile)."""
MAX_JPEG_SCANS = 64
"""Scans in a JPEG's main image (baseline: 1-3, progressive: 6-12). libjpeg re-walks every coefficient of the
image in each scan: a 120 KB progressive file with 1,000 scans takes 9 s at 4096x4096."""
MAX_JUNK_BYTES = 65_536
"""Bytes between JPEG segments or GIF blocks that belong to none (Pillow skips them one at a time in Python)."""
MAX_GIF_BLOCKS = 65_536
"""GIF extension sub-blocks before the first frame (Pillow reads each in Python)."""

_SIXTEEN_BIT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}

# EXIF orientation -> the transpose that displays the stored image upright (what ImageOps.exif_transpose does,
# minus its metadata rewriting, which can fail on malformed EXIF after the pixels are fine).
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


# ----------------------------------------------------------------------------------------------- format sniffing


_BMP_HEADERS = {12, 40, 52, 56, 64, 108, 124}


def _is_bmp(data: bytes) -> bool:
    # "BM" alone is two letters of text; the DIB header size that follows is what makes it a bitmap (Pillow's check).
    return data.startswith(b"BM") and len(data) >= 18 and struct.unpack_from("<I", data, 14)[0] in _BMP_HEADERS


def _accepted_format(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "WEBP"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if _is_bmp(data):
        return "BMP"
    return None


_ISO_BRANDS = {b"avif": "AVIF", b"avis": "AVIF", b"heic": "HEIC", b"heix": "HEIC", b"heim": "HEIC",
               b"heis": "HEIC", b"hevc": "HEIC", b"hevx": "HEIC", b"mif1": "HEIF", b"msf1": "HEIF",
               b"jxl ": "JPEG XL", b"crx ": "Canon CR3"}
# Signatures of image (and image-like document) formats that are recognised only to be refused by name.
_REFUSED_SIGNATURES: tuple[tuple[bytes, int, str], ...] = (
    (b"%!PS-Adobe", 0, "EPS"), (b"%!PS", 0, "PostScript"), (b"\xc5\xd0\xd3\xc6", 0, "EPS"),
    (b"%PDF-", 0, "PDF"),
    (b"II*\x00", 0, "TIFF"), (b"MM\x00*", 0, "TIFF"), (b"II+\x00", 0, "TIFF"), (b"MM\x00+", 0, "TIFF"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", 0, "JPEG 2000"), (b"\xff\x4f\xff\x51", 0, "JPEG 2000"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", 0, "JPEG XL"), (b"\xff\x0a", 0, "JPEG XL"),
    (b"DDS ", 0, "DDS"), (b"BLP1", 0, "BLP"), (b"BLP2", 0, "BLP"), (b"icns", 0, "ICNS"),
    (b"\x00\x00\x01\x00", 0, "ICO"), (b"\x00\x00\x02\x00", 0, "CUR"), (b"8BPS", 0, "PSD"), (b"qoif", 0, "QOI"),
    (b"SIMPLE  =", 0, "FITS"), (b"\x01\xda", 0, "SGI"), (b"\x59\xa6\x6a\x95", 0, "Sun Raster"),
    (b"\xb1\x68\xde\x3a", 0, "DCX"), (b"#define", 0, "XBM"), (b"/* XPM */", 0, "XPM"),
    (b"\xd7\xcd\xc6\x9a", 0, "WMF"), (b" EMF", 40, "EMF"), (b"FTEX", 0, "FTEX"), (b"GIMP", 20, "GBR"),
    (b"#?RADIANCE", 0, "Radiance HDR"), (b"#?RGBE", 0, "Radiance HDR"), (b"v/1\x01", 0, "OpenEXR"),
    (b"Image type:", 0, "IM"),
)
_NETPBM = re.compile(rb"P[1-7fF][ \t\r\n]")
_SVG = re.compile(rb"<svg[\s>/]", re.IGNORECASE)


def _refused_format(data: bytes) -> str | None:
    """The name of the image format ``data`` is in when it is one that is recognised but not accepted."""
    for magic, offset, name in _REFUSED_SIGNATURES:
        if data.startswith(magic, offset):
            return name
    if data[4:8] == b"ftyp":
        brand = data[8:12]
        return _ISO_BRANDS.get(brand, f"ISO media ({brand.decode('latin-1')!r})")
    if _NETPBM.match(data):
        return "Netpbm (PBM/PGM/PPM/PFM)"
    if data[:1] == b"\x0a" and data[1:2] in (b"\x00", b"\x02", b"\x03", b"\x04", b"\x05") and data[2:3] == b"\x01":
        return "PCX"
    if data.endswith(b"TRUEVISION-XFILE.\x00"):
        return "TGA"
    head = data[:4096].lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"<") and _SVG.search(head):
        return "SVG"
    return None


def _unsupported(field: str, what: str) -> InputError:
    return InputError(field, ErrorCode.UNSUPPORTED_FORMAT, f"{what}; accepted formats: {_ACCEPTED_TEXT}")


def _refused(field: str, what: str) -> InputError:
    """A file of an accepted format past one of the structural bounds (see MAX_PNG_CHUNKS and the others)."""
    return InputError(field, ErrorCode.UNSUPPORTED_FORMAT,
                      f"{what}: more than any encoder writes, and refused because decoding it would cost far more "
                      "than its size suggests")


# ------------------------------------------------------------------------------------------------ header reading
#
# Each reader takes the bytes of an accepted format and returns the (width, height) its header announces, or None
# when it cannot tell (Pillow then decides, and our check on the opened image's size still runs before any pixel
# is decoded). Readers also enforce the structural bounds above. They only index and slice bytes: every read is
# bounds-checked, so a reader never raises anything but InputError.


def _u16be(data: bytes, pos: int) -> int:
    return int.from_bytes(data[pos : pos + 2], "big")


def _png_size(data: bytes, field: str) -> tuple[int, int] | None:
    size = struct.unpack(">II", data[16:24]) if data[12:16] == b"IHDR" and len(data) >= 24 else None
    pos, chunks = 8, 0
    while pos + 8 <= len(data):
        length = struct.unpack_from(">I", data, pos)[0]
        chunks += 1
        if chunks > MAX_PNG_CHUNKS:
            raise _refused(field, f"the PNG has more than {MAX_PNG_CHUNKS} chunks")
        if data[pos + 4 : pos + 8] == b"IEND":
            break
        pos += 12 + length
    return size


_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # DHT, JPG and DAC share the range
_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xDA)})  # TEM, RSTn, SOI, EOI: no length field
_FILL = re.compile(rb"\xff+")
# After a scan header: the next marker. Entropy-coded data escapes each 0xFF data byte as FF00 and RSTn markers
# (FFD0-FFD7) sit inside it, so the first 0xFF followed by anything else is the end of the scan.
_NEXT_MARKER = re.compile(rb"\xff+([^\x00\xd0-\xd7\xff])")


def _jpeg_size(data: bytes, field: str) -> tuple[int, int] | None:
    # Walks the marker segments the way Pillow's JPEG plugin does (in Python) up to the first scan, then the
    # scans of the main image the way libjpeg does, counting both.
    size: tuple[int, int] | None = None
    pos, segments, junk = 2, 0, 0
    while pos < len(data):  # up to the first scan: Pillow's Python loop, per segment and per stray byte
        if data[pos] != 0xFF:
            found = data.find(b"\xff", pos)
            junk += (found if found >= 0 else len(data)) - pos
            if found < 0:
                break
            pos = found
        fill = _FILL.match(data, pos)
        assert fill is not None  # data[pos] is 0xFF
        junk += fill.end() - pos - 1
        pos = fill.end()
        if junk > MAX_JUNK_BYTES:
            raise _refused(field, f"the JPEG has more than {MAX_JUNK_BYTES} stray bytes between its segments")
        if pos >= len(data):
            return size
        marker = data[pos]
        pos += 1
        if marker == 0x00:  # an escaped 0xFF outside a scan: one more stray byte
            junk += 1
            continue
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            raise _refused(field, f"the JPEG has more than {MAX_JPEG_SEGMENTS} segments")
        if marker in _STANDALONE_MARKERS:
            continue
        if marker in _SOF_MARKERS and pos + 7 <= len(data):
            height, width = _u16be(data, pos + 3), _u16be(data, pos + 5)
            if size is None or width * height > size[0] * size[1]:  # several SOFs: the largest is the bound
                size = (width, height)
        pos += _u16be(data, pos)
        if marker == 0xDA:
            break
    else:
        return size
    scans = 1
    while (found_marker := _NEXT_MARKER.search(data, pos)) is not None:  # the scans: libjpeg's C loop
        marker, pos = found_marker.group(1)[0], found_marker.end()
        if marker == 0xD9:  # the end of the main image; an MPO's second image or appended data is not decoded
            break
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            raise _refused(field, f"the JPEG has more than {MAX_JPEG_SEGMENTS} segments")
        if marker == 0xDA:
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise _refused(field, f"the JPEG has more than {MAX_JPEG_SCANS} scans")
        if marker not in _STANDALONE_MARKERS:
            pos += _u16be(data, pos)  # skip the segment, so that bytes inside a COM or APP cannot fake a marker
    return size


def _webp_size(data: bytes, field: str) -> tuple[int, int] | None:
    # The canvas, as libwebp reads it (and Pillow's own pre-check): libwebp allocates it when the decoder is
    # created, before Pillow returns from open(), so this size must be known and checked first.
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    raise InputError(field, ErrorCode.TRUNCATED_IMAGE, "the WebP header is truncated or corrupt")


_GIF_JUNK = re.compile(rb"[^!,;]*")


def _gif_size(data: bytes, field: str) -> tuple[int, int] | None:
    if len(data) < 13:
        return None
    width, height = int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little")
    flags = data[10]
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    blocks = junk = 0
    while pos < len(data):
        skipped = _GIF_JUNK.match(data, pos)
        assert skipped is not None  # the pattern matches the empty string
        junk += skipped.end() - pos
        if junk > MAX_JUNK_BYTES:
            raise _refused(field, f"the GIF has more than {MAX_JUNK_BYTES} stray bytes between its blocks")
        pos = skipped.end()
        if pos >= len(data) or data[pos] == 0x3B:
            # No frame: Pillow finds no image in it (not_an_image), whatever the screen size says.
            return None
        if data[pos] == 0x2C:  # the first frame: Pillow grows the canvas to hold it, so the bound does too
            if pos + 9 > len(data):
                return None
            left, top, w, h = struct.unpack_from("<HHHH", data, pos + 1)
            return max(width, left + w), max(height, top + h)
        pos += 2  # "!" and the extension label, then its sub-blocks
        while pos < len(data):
            blocks += 1
            if blocks > MAX_GIF_BLOCKS:
                raise _refused(field, f"the GIF has more than {MAX_GIF_BLOCKS} blocks before its first frame")
            length = data[pos]
            pos += 1 + length
            if length == 0:
                break
    return None


def _bmp_size(data: bytes, field: str) -> tuple[int, int] | None:
    header = struct.unpack_from("<I", data, 14)[0]
    if header == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes, never compressed
        return (int.from_bytes(data[18:20], "little"), int.from_bytes(data[20:22], "little")) \
            if len(data) >= 22 else None
    if len(data) < 34:
        return None
    width, height, _, _, compression = struct.unpack_from("<IIHHI", data, 18)
    if compression in (1, 2):
        raise InputError(field, ErrorCode.UNSUPPORTED_FORMAT,
                         f"the data is a BMP file with RLE{8 if compression == 1 else 4} compression; only "
                         "uncompressed and bit-field BMPs are accepted")
    # Exactly Pillow's reading: the width is unsigned; a height whose top byte is 0xFF is negative (rows stored
    # top-down), anything else is unsigned. (Reading the width as signed made 0xFFFFFFFF a width of 1.)
    return width, (2**32 - height if data[25] == 0xFF else height)


_HEADER_READERS = {"PNG": _png_size, "JPEG": _jpeg_size, "WEBP": _webp_size, "GIF": _gif_size, "BMP": _bmp_size}
assert set(_HEADER_READERS) == set(ACCEPTED_FORMATS)


# ----------------------------------------------------------------------------------------------------- decoding


def _too_many_pixels(field: str, width: int, height: int, max_pixels: int) -> InputError:
    return InputError(field, ErrorCode.TOO_MANY_PIXELS,
                      f"the image is {width}x{height} ({width * height} pixels); at most {max_pixels} pixels are "
                      "accepted")


def _pillow_bomb(field: str, max_pixels: int, size: tuple[int, int] | None) -> InputError:
    """Pillow's own decompression-bomb check fired: answer with the service's limit, never Pillow's text."""
    if size is not None and size[0] * size[1] > max_pixels:
        return _too_many_pixels(field, size[0], size[1], max_pixels)
    pillow_limit = Image.MAX_IMAGE_PIXELS  # read, never written: it is one global for every thread
    if pillow_limit is None or max_pixels <= pillow_limit:
        # Pillow refuses only above its own limit, which is at least ours here: the image is over ours too.
        return InputError(field, ErrorCode.TOO_MANY_PIXELS,
                          f"the image is larger than the limit of {max_pixels} pixels")
    return InputError(field, ErrorCode.TOO_MANY_PIXELS,
                      f"the image is larger than this server's image decoder accepts, which is less than the limit "
                      f"of {max_pixels} pixels")


def _decoder_failure(field: str, exc: BaseException, max_pixels: int, size: tuple[int, int] | None) -> InputError:
    """The one mapping of whatever a decoder raised (opening, loading, converting) to an InputError."""
    if isinstance(exc, InputError):
        return exc
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return _pillow_bomb(field, max_pixels, size)
    if isinstance(exc, ValueError) and "Decompressed Data Too Large" in str(exc):  # a PNG text or ICC bomb
        return InputError(field, ErrorCode.UNSUPPORTED_FORMAT,
                          "the image's compressed metadata (a text or ICC profile chunk) expands beyond the safe limit")
    detail = str(exc) or "no detail"
    return InputError(field, ErrorCode.TRUNCATED_IMAGE,
                      f"the image data is truncated or corrupt ({type(exc).__name__}: {detail})")


class _Opened:
    """An image opened from bytes, with what the header reader found (for messages)."""

    __slots__ = ("image", "size")

    def __init__(self, image: Image.Image, size: tuple[int, int] | None) -> None:
        self.image = image
        self.size = size


def _open(data: ImageSource, field: str, max_pixels: int) -> _Opened:
    """Recognise, bound and open ``data`` lazily: only the header is read, no pixels are decoded yet."""
    if isinstance(data, (str, Path)):
        try:
            data = Path(data).read_bytes()
        except OSError as exc:
            raise InputError(field, ErrorCode.UNREADABLE_FILE,
                             f"cannot read file {str(data)!r}: {exc.strerror}") from exc
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InputError(field, ErrorCode.NOT_AN_IMAGE, f"unsupported input type {type(data).__name__}")
    data = bytes(data)
    if len(data) == 0:
        raise InputError(field, ErrorCode.NOT_AN_IMAGE, "the file is empty")
    fmt = _accepted_format(data)
    if fmt is None:
        refused = _refused_format(data)
        if refused is not None:
            raise _unsupported(field, f"the data is in {refused} format")
        raise InputError(field, ErrorCode.NOT_AN_IMAGE, f"the data is not an image in an accepted format "
                                                         f"({_ACCEPTED_TEXT})")
    # Our limit is checked from the header before Pillow opens anything: Pillow's own bomb check (a process global
    # at 89 MP, raising at twice that) then never decides first, and WebP's canvas is never allocated unchecked.
    # (Changing Image.MAX_IMAGE_PIXELS per call would race other threads; warnings.catch_warnings too.)
    size = _HEADER_READERS[fmt](data, field)
    if size is not None and size[0] * size[1] > max_pixels:
        raise _too_many_pixels(field, size[0], size[1], max_pixels)
    try:
        # formats=[fmt]: the plugin the bytes were recognised as, and no other, may parse them.
        return _Opened(Image.open(io.BytesIO(data), formats=[fmt]), size)
    except UnidentifiedImageError as exc:
        # The plugin refused the header outright: a signature with no image behind it (e.g. text after "GIF89a").
        name = ACCEPTED_FORMATS[fmt]
        raise InputError(field, ErrorCode.NOT_AN_IMAGE,
                         f"the data starts like a {name} file but has no readable {name} header") from exc
    except Exception as exc:  # any decoder failure is the upload's fault, never a 500
        raise _decoder_failure(field, exc, max_pixels, size) from exc


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1))
    except Exception:  # malformed EXIF must not sink a decodable image: keep it as stored
        return 1


def _load(image: Image.Image, field: str, max_pixels: int, size: tuple[int, int] | None) -> Image.Image:
    """Check the announced size, fully decode (the first frame only), and apply the EXIF orientation."""
    width, height = image.size
    if width < 1 or height < 1:
        raise InputError(field, ErrorCode.NOT_AN_IMAGE, f"the image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise _too_many_pixels(field, width, height, max_pixels)
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # re-asserted in case anything in the process flipped the global
    try:
        # load() decodes the current frame only; n_frames / is_animated are never asked for, since answering
        # them walks every frame of a GIF.
        image.load()
        transpose = _ORIENTATION.get(_orientation(image))
        return image.transpose(transpose) if transpose is not None else image
    except Exception as exc:
        raise _decoder_failure(field, exc, max_pixels, size or (width, height)) from exc


def _sixteen_bit_to_uint8(values: np.ndarray) -> np.ndarray:
    """Scale 16-bit samples (0..65535; wider integer modes are clipped to that range) to 0..255."""
    return np.rint(np.clip(values.astype(np.float64), 0, 65535) / 257).astype(np.uint8)


def _pil_to_arrays(image: Image.Image, field: str, max_pixels: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Split a decoded image into colour (H, W) grey or (H, W, 3) RGB uint8 and an (H, W) uint8 alpha or None."""
    try:
        return _split_channels(image, field)
    except Exception as exc:  # a conversion that fails on damaged data (palette, ICC, ...) is the upload's fault
        raise _decoder_failure(field, exc, max_pixels, image.size) from exc


def _split_channels(image: Image.Image, field: str) -> tuple[np.ndarray, np.ndarray | None]:
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_uint8(np.asarray(image)), None
    if mode == "F":
        return np.rint(np.clip(np.asarray(image, dtype=np.float64), 0, 255)).astype(np.uint8), None
    if mode == "P":
        # A palette's transparency (a colour index or per-index alpha table) becomes a real alpha channel.
        target = "RGBA" if "transparency" in image.info else "RGB"
    elif mode in ("PA", "RGBa", "RGBA"):
        target = "RGBA"
    elif mode in ("La", "LA"):
        target = "LA"
    elif mode in ("1", "L"):
        target = "L"
    else:
        target = "RGB"  # RGB itself, CMYK, YCbCr, LAB, HSV, RGBX, ...
    if mode != target:
        try:
            image = image.convert(target)
        except ValueError as exc:  # Pillow has no conversion from this mode (a Pillow image given directly)
            raise InputError(field, ErrorCode.NOT_AN_IMAGE, f"unsupported image mode {mode}") from exc
    array = np.asarray(image)
    if target == "LA":
        return array[..., 0], array[..., 1]
    if target == "RGBA":
        return array[..., :3], array[..., 3]
    return array, None


def _array_to_uint8(array: np.ndarray, field: str) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * np.uint8(255)
    if array.dtype == np.uint16:
        return _sixteen_bit_to_uint8(array)
    if np.issubdtype(array.dtype, np.integer) and array.size and 0 <= array.min() and array.max() <= 255:
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating) and array.size and 0.0 <= array.min() and array.max() <= 1.0:
        return np.rint(array * 255).astype(np.uint8)
    raise InputError(field, ErrorCode.NOT_AN_IMAGE,
                     f"unsupported array of dtype {array.dtype}: use uint8, uint16, bool or floats in [0, 1]")


def _ndarray_to_arrays(array: np.ndarray, field: str, max_pixels: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Same split as :func:`_pil_to_arrays` for an array already in memory (assumed RGB(A) channel order)."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise InputError(field, ErrorCode.NOT_AN_IMAGE,
                         f"expected an (H, W), (H, W, 3) or (H, W, 4) array, got {array.shape}")
    height, width = array.shape[:2]
    if height < 1 or width < 1:
        raise InputError(field, ErrorCode.NOT_AN_IMAGE, f"the image has no pixels ({width}x{height})")
    if height * width > max_pixels:
        raise _too_many_pixels(field, width, height, max_pixels)
    array = _array_to_uint8(array, field)
    if array.ndim == 3 and array.shape[2] == 4:
        return array[..., :3], array[..., 3]
    return array, None


def _decode(data: ImageSource, field: str, max_pixels: int) -> tuple[np.ndarray, np.ndarray | None]:
    if isinstance(data, np.ndarray):
        return _ndarray_to_arrays(data, field, max_pixels)
    if isinstance(data, Image.Image):
        return _pil_to_arrays(_load(data, field, max_pixels, None), field, max_pixels)
    opened = _open(data, field, max_pixels)
    try:
        return _pil_to_arrays(_load(opened.image, field, max_pixels, opened.size), field, max_pixels)
    finally:
        opened.image.close()


def _to_rgb(color: np.ndarray) -> np.ndarray:
    if color.ndim == 2:
        color = np.repeat(color[..., None], 3, axis=2)
    return np.ascontiguousarray(color, dtype=np.uint8)


def _size_text(shape: tuple[int, ...]) -> str:
    return f"{shape[1]}x{shape[0]}"


# --------------------------------------------------------------------------------------------------- public API


def load_image(data: ImageSource, *, field: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an image to (H, W, 3) uint8 RGB.

    EXIF orientation is applied; greyscale is replicated to three channels; 16-bit samples are scaled to 8 bits
    (``round(v / 257)``); CMYK and other colour spaces go through Pillow's RGB conversion; an alpha channel is
    dropped without compositing (the colour values are kept as stored, as upstream does). Arrays are taken as
    RGB(A) order. Raises :class:`InputError` naming ``field`` (see the module docstring for the codes).
    """
    color, _ = _decode(data, field, max_pixels)
    return _to_rgb(color)


def mask_from_arrays(color: np.ndarray, alpha: np.ndarray | None) -> np.ndarray:
    """The mask rule, applied to decoded colour (grey or RGB uint8) and optional alpha.

    * With an alpha channel that is not fully opaque, the alpha is the mask (``alpha > 128``): a cut-out or a
      stroke drawn on a transparent layer, whatever its colour.
    * Otherwise greyscale is ``value > 128`` and RGB is "any channel": ``max(R, G, B) > 128``. For grey masks
      this equals the luminance rule; unlike luminance it also accepts strokes in a saturated colour (pure red
      has luminance 76), which is how masks are often drawn.
    """
    if alpha is not None and alpha.min() < 255:
        return alpha > MASK_THRESHOLD
    if color.ndim == 3:
        color = color.max(axis=2)
    return color > MASK_THRESHOLD


def load_mask(
    data: ImageSource,
    *,
    field: str,
    size: tuple[int, int] | None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Decode a mask to (H, W) bool.

    Files may be 1-bit, L, LA, P (through its palette, transparency as alpha), RGB(A), I;16 or I (16-bit range);
    :func:`mask_from_arrays` gives the rule. Arrays may be bool, 0/1 integers (non-zero is inside), uint8 or
    uint16 (``> 128`` on the 8-bit scale) or floats in [0, 1]. ``size`` is the ``(height, width)`` the mask must
    have (its image's ``shape[:2]``), or None to skip the check.

    Raises :class:`InputError` naming ``field``: decoding codes, ``size_mismatch`` with both sizes, and
    ``empty_mask`` if no pixel is inside.
    """
    if (
        isinstance(data, np.ndarray)
        and data.ndim == 2
        and np.issubdtype(data.dtype, np.integer)
        and data.size
        and 0 <= data.min()
        and data.max() <= 1
    ):
        if data.size > max_pixels:
            raise _too_many_pixels(field, data.shape[1], data.shape[0], max_pixels)
        mask = data != 0
    else:
        mask = mask_from_arrays(*_decode(data, field, max_pixels))
    if size is not None and mask.shape != tuple(size):
        raise InputError(field, ErrorCode.SIZE_MISMATCH,
                         f"the mask is {_size_text(mask.shape)} but its image is {_size_text(tuple(size))}")
    if not mask.any():
        raise InputError(field, ErrorCode.EMPTY_MASK, "the mask is empty (no pixel above 128)")
    return mask


def load_reference(
    data: ImageSource,
    mask: ImageSource | None = None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[np.ndarray, np.ndarray]:
    """Decode the reference object: (H, W, 3) uint8 RGB and its (H, W) bool mask.

    With ``mask`` given it is loaded as field ``reference_mask`` and must match the reference's size. Without
    one, the reference's alpha channel (RGBA, LA, PA or a palette with transparency) is the mask,
    ``alpha > 128``; a reference without alpha then fails with ``missing_mask`` on ``reference_mask``, and one
    whose alpha hides everything fails with ``empty_mask`` on ``reference``. Masks under the pre-processing
    minimum of pixels fail with ``mask_too_small`` on the field the mask came from.
    """
    color, alpha = _decode(data, "reference", max_pixels)
    rgb = _to_rgb(color)
    if mask is not None:
        field = "reference_mask"
        object_mask = load_mask(mask, field=field, size=rgb.shape[:2], max_pixels=max_pixels)
    elif alpha is None:
        raise InputError("reference_mask", ErrorCode.MISSING_MASK,
                         "the reference has no alpha channel: send an RGBA cut-out or a reference_mask")
    else:
        field = "reference"
        object_mask = alpha > MASK_THRESHOLD
        if not object_mask.any():
            raise InputError(field, ErrorCode.EMPTY_MASK, "the reference's alpha channel is fully transparent")
    count = int(np.count_nonzero(object_mask))
    if count < MIN_MASK_PIXELS:
        raise InputError(field, ErrorCode.MASK_TOO_SMALL,
                         f"the object has {count} pixels; at least {MIN_MASK_PIXELS} are needed")
    return rgb, object_mask
