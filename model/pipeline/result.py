"""What a generation gives back, and the one definition of its stage names and their formats."""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass, field

from PIL import Image, PngImagePlugin

# The pipeline's stages, in order; a served request adds its queue wait before them and the total after.
STAGES = ("preprocess", "encode", "sample", "decode", "postprocess")
TIMING_NAMES = ("queue", *STAGES, "total")
DEMO_LABEL = "DEMO (tiny random weights, not the AnyDoor model)"


@dataclass(frozen=True)
class GenerationResult:
    image: Image.Image
    seed: int
    timings: Mapping[str, float]  # seconds per stage (STAGES) and "total"
    regions: int
    is_demo: bool = False
    boxes: tuple[tuple[int, int, int, int], ...] = field(default=())  # the target boxes (x, y, w, h), in order

    def to_png(self) -> bytes:
        """The image as PNG bytes, with the seed (and a demo label where it applies) in text chunks."""
        info = PngImagePlugin.PngInfo()
        info.add_text("anydoor:seed", str(self.seed))
        if self.is_demo:
            info.add_text("anydoor:model", DEMO_LABEL)
        buf = io.BytesIO()
        self.image.save(buf, format="PNG", pnginfo=info)
        return buf.getvalue()


def server_timing(timings: Mapping[str, float]) -> str:
    """The ``Server-Timing`` header (https://www.w3.org/TR/server-timing/): milliseconds per stage, in order."""
    return ", ".join(f"{name};dur={timings[name] * 1000:.1f}" for name in TIMING_NAMES if name in timings)


def timings_text(timings: Mapping[str, float]) -> str:
    """Timings for logs and the command line: ``preprocess=0.021s encode=0.080s ...``."""
    return " ".join(f"{name}={timings[name]:.3f}s" for name in TIMING_NAMES if name in timings)
