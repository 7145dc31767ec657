"""What a generation gives back, and the one definition of its stage names and their formats."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from PIL import Image, PngImagePlugin

# The pipeline's stages, in order; a served request adds its queue wait before them, then "output" (encoding the
# answer's image in its output_format, timed by the surface that encodes it: the service, Cog) and the total.
# "score" is the identity and background measurement of :mod:`model.pipeline.scores`.
STAGES = ("preprocess", "encode", "sample", "decode", "postprocess", "score")
OUTPUT_STAGE = "output"
TIMING_NAMES = ("queue", *STAGES, OUTPUT_STAGE, "total")
DEMO_LABEL = "DEMO (tiny random weights, not the AnyDoor model)"
# zlib level of the PNG answers, chosen by benchmarks/host_time.py (benchmarks/results/cpu-host_time.txt): at
# 3840x2160 level 1 encodes in 0.59 s against 4.0 s for Pillow's default 6, 1.6 times faster than level 3, for a
# file 16 % larger than level 6's. (A client that wants small files asks for webp or jpeg.)
PNG_COMPRESS_LEVEL = 1
# libwebp's speed/size trade-off (0 fastest .. 6 smallest; Pillow's default 4), by the same benchmark: method 0 is
# 3 times faster than 4 at 3840x2160 for a file 3 % larger.
WEBP_METHOD = 0
EXIF_DESCRIPTION = 0x010E  # ImageDescription: "anydoor:seed=...; anydoor:model=..." in JPEG and WebP answers
EXIF_SOFTWARE = 0x0131


@dataclass(frozen=True)
class Scores:
    """How faithful a result is (:mod:`model.pipeline.scores`): per-region identity, background PSNR."""

    identity: tuple[float, ...]  # cosine similarity in [-1, 1], one per region, in region order
    background_psnr: float | None  # dB outside the target regions; None where they are unchanged (infinite)

    @property
    def mean_identity(self) -> float:
        """The ranking score of a candidate: the mean identity over its regions."""
        return sum(self.identity) / len(self.identity) if self.identity else 0.0

    def to_dict(self) -> dict[str, object]:
        return {"identity": round(self.mean_identity, 6), "region_identity": [round(v, 6) for v in self.identity],
                "background_psnr": None if self.background_psnr is None else round(self.background_psnr, 4)}


@dataclass(frozen=True)
class GenerationResult:
    image: Image.Image
    seed: int
    timings: Mapping[str, float]  # seconds per stage (STAGES) and "total"
    regions: int
    is_demo: bool = False
    boxes: tuple[tuple[int, int, int, int], ...] = field(default=())  # the target boxes (x, y, w, h), in order
    scores: Scores | None = None
    # With num_outputs > 1: every candidate (this one included), best first (rank_candidates); else empty.
    candidates: tuple[GenerationResult, ...] = ()

    def to_png(self) -> bytes:
        """The image as PNG bytes, with the seed (and a demo label where it applies) in text chunks."""
        return self.encode("png")

    def encode(self, output_format: str = "png", quality: int = 90) -> bytes:
        """The image in ``output_format`` (``png``, ``jpeg``, ``webp``; ``quality`` 1-100 for the lossy two), with
        the seed and the demo label in its metadata: PNG text chunks ``anydoor:seed``/``anydoor:model``, or EXIF
        ImageDescription ``anydoor:seed=S`` (``; anydoor:model=...`` in demo mode) and Software."""
        buf = io.BytesIO()
        tags = {"anydoor:seed": str(self.seed)}
        if self.is_demo:
            tags["anydoor:model"] = DEMO_LABEL
        if output_format == "png":
            info = PngImagePlugin.PngInfo()
            for key, value in tags.items():
                info.add_text(key, value)
            self.image.save(buf, format="PNG", pnginfo=info, compress_level=PNG_COMPRESS_LEVEL)
        elif output_format in ("jpeg", "webp"):
            exif = Image.Exif()
            exif[EXIF_DESCRIPTION] = "; ".join(f"{key}={value}" for key, value in tags.items())
            exif[EXIF_SOFTWARE] = "AnyDoor Serve"
            if output_format == "jpeg":
                self.image.save(buf, format="JPEG", quality=quality, exif=exif.tobytes())
            else:
                self.image.save(buf, format="WEBP", quality=quality, method=WEBP_METHOD, exif=exif.tobytes())
        else:
            raise ValueError(f"unknown output format {output_format!r}")
        return buf.getvalue()


def read_metadata(image: Image.Image) -> dict[str, str]:
    """The ``anydoor:*`` metadata of an answer opened with Pillow, whatever its format."""
    text = getattr(image, "text", None)
    if text:
        return {k: v for k, v in text.items() if k.startswith("anydoor:")}
    description = image.getexif().get(EXIF_DESCRIPTION, "")
    return dict(part.split("=", 1) for part in str(description).split("; ") if part.startswith("anydoor:"))


def rank_candidates(results: Sequence[GenerationResult]) -> GenerationResult:
    """The best of a request's candidates (highest mean identity; on a tie the lower seed offset, i.e. the
    earlier candidate), carrying all of them best first in :attr:`GenerationResult.candidates`."""
    if len(results) == 1:
        return results[0]
    def rank(k: int) -> tuple[float, int]:
        scores = results[k].scores
        return (-(scores.mean_identity if scores is not None else 0.0), k)

    order = sorted(range(len(results)), key=rank)
    ranked = tuple(replace(results[k], candidates=()) for k in order)
    return replace(ranked[0], candidates=ranked)


def server_timing(timings: Mapping[str, float]) -> str:
    """The ``Server-Timing`` header (https://www.w3.org/TR/server-timing/): milliseconds per stage, in order."""
    return ", ".join(f"{name};dur={timings[name] * 1000:.1f}" for name in TIMING_NAMES if name in timings)


def timings_text(timings: Mapping[str, float]) -> str:
    """Timings for logs and the command line: ``preprocess=0.021s encode=0.080s ...``."""
    return " ".join(f"{name}={timings[name]:.3f}s" for name in TIMING_NAMES if name in timings)
