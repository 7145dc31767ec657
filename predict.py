"""Cog predictor for AnyDoor: the same pipeline as the HTTP service's ``POST /predict``, with the same inputs.

Configured exactly like the service, by its :class:`service.config.Settings` read from the environment:
``ANYDOOR_WEIGHTS`` (a path or an http(s) URL, downloaded once into ``ANYDOOR_CACHE_DIR`` and checked against
``ANYDOOR_WEIGHTS_SHA256``), ``ANYDOOR_CONFIG``, ``ANYDOOR_DEVICE``, ``ANYDOOR_DTYPE``, ``ANYDOOR_MAX_PIXELS``,
``ANYDOOR_WARMUP_STEPS``, ``ANYDOOR_DEMO``; the weights are loaded by the service's own loader. Where neither
``ANYDOOR_WEIGHTS`` nor ``ANYDOOR_DEMO`` is set, the weights Cog hands to ``setup`` (Replicate's ``COG_WEIGHTS``)
are used.

Unlike upstream's predictor, the seed is honoured: the same inputs, parameters and seed give the same PNG.
"""

# No `from __future__ import annotations`: Cog reads the input types from the live annotations.

import os
import tempfile
from typing import Any

from cog import BaseRunner, Input, Path
from PIL import Image

from model.pipeline import (
    DEFAULT_CONTROL_STRENGTH,
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_STEPS,
    PARAM_LIMITS,
    SAMPLERS,
    GenerationResult,
)
from model.regions import parse_boxes
from model.sampler import DPMPP_DEFAULT_STEPS
from service.config import Settings
from service.inference import load_pipeline

STEPS_MIN, STEPS_MAX = (int(v) for v in PARAM_LIMITS["steps"])
GUIDANCE_MIN, GUIDANCE_MAX = PARAM_LIMITS["guidance_scale"]
CONTROL_MIN, CONTROL_MAX = PARAM_LIMITS["control_strength"]
SEED_MIN, SEED_MAX = (int(v) for v in PARAM_LIMITS["seed"])


class Predictor(BaseRunner):
    def setup(self, weights: Any = None) -> None:
        """Load the weights once and run a warm-up generation, as the service does before it reports ready."""
        configured = any(os.environ.get(name, "").strip() for name in ("ANYDOOR_WEIGHTS", "ANYDOOR_DEMO"))
        settings = Settings.from_env(weights=None if configured or not weights else str(weights))
        self.settings = settings
        self.pipe = load_pipeline(settings)
        self.out_dir = Path(tempfile.mkdtemp(prefix="anydoor-cog-"))
        self._warm_up(settings.warmup_steps)
        print(f"AnyDoor ready: {self.pipe.weights_name} on {self.pipe.device} ({self.pipe.dtype})", flush=True)

    def _generate(self, *args: Any, **kwargs: Any) -> GenerationResult:
        return self.pipe.run_jobs([self.pipe.prepare(*args, **kwargs)])[0]

    def _warm_up(self, steps: int) -> None:
        # Every network once, so the first real request does not pay for lazy initialisation (CUDA context,
        # cuDNN algorithm search, allocator growth).
        reference = Image.new("RGBA", (64, 64), (200, 40, 40, 0))
        reference.paste((200, 40, 40, 255), (16, 16, 48, 48))
        background = Image.new("RGB", (256, 256), (90, 120, 150))
        self._generate(reference, background, boxes=[(64, 64, 128, 128)], steps=steps, seed=0)

    def run(
        self,
        reference: Path = Input(
            description="The object to insert. A PNG with transparency uses its alpha channel as the object mask; "
            "otherwise give reference_mask."
        ),
        background: Path = Input(description="The scene to insert the object into; the output has its size."),
        reference_mask: Path | None = Input(
            default=None,
            description="Mask of the object in reference (white = object, > 128). Overrides the alpha channel.",
        ),
        background_mask: Path | None = Input(
            default=None,
            description="Where to insert: white (> 128) marks the target region, same size as background. "
            "Separate regions each get the object. Give this or box.",
        ),
        box: str | None = Input(
            default=None,
            description="Where to insert, instead of background_mask: one or more boxes 'x,y,w,h' in background "
            "pixels, separated by ';' (e.g. '40,60,200,180;300,60,150,150').",
        ),
        steps: int = Input(
            default=DEFAULT_STEPS, ge=STEPS_MIN, le=STEPS_MAX, description="DDIM sampling steps (exactly this many)."
        ),
        guidance_scale: float = Input(
            default=DEFAULT_GUIDANCE_SCALE,
            ge=GUIDANCE_MIN,
            le=GUIDANCE_MAX,
            description="Classifier-free guidance scale; 1 turns guidance off.",
        ),
        control_strength: float = Input(
            default=DEFAULT_CONTROL_STRENGTH,
            ge=CONTROL_MIN,
            le=CONTROL_MAX,
            description="Scale of the ControlNet's detail (collage) guidance.",
        ),
        shape_control: bool = Input(
            default=False, description="Follow the shape of background_mask instead of filling its bounding box."
        ),
        seed: int | None = Input(
            default=None,
            ge=SEED_MIN,
            le=SEED_MAX,
            description="Random seed; the same inputs, parameters and seed give the same image. "
            "Leave empty for a random one (it is logged and recorded as the 'seed' metric).",
        ),
        sampler: str = Input(
            default="ddim",
            choices=list(SAMPLERS),
            description="ddim (upstream's sampler) or dpmpp_2m (DPM-Solver++(2M): similar quality in fewer steps, "
            f"about {DPMPP_DEFAULT_STEPS}).",
        ),
    ) -> Path:
        """Insert the object of ``reference`` into each target region of ``background``; returns a PNG."""
        result = self._generate(
            reference,
            background,
            background_mask=background_mask,
            boxes=parse_boxes(box) if box is not None and box.strip() else None,
            reference_mask=reference_mask,
            steps=steps,
            guidance_scale=guidance_scale,
            control_strength=control_strength,
            shape_control=shape_control,
            seed=seed,
            sampler=sampler,
            max_pixels=self.settings.max_pixels,
        )
        self.record_metric("seed", result.seed)
        self.record_metric("regions", result.regions)
        for stage, seconds in result.timings.items():
            self.record_metric(f"timing.{stage}", round(seconds, 4))
        timings = " ".join(f"{stage}={seconds:.3f}s" for stage, seconds in result.timings.items())
        print(f"seed={result.seed} regions={result.regions} {timings}", flush=True)

        fd, name = tempfile.mkstemp(suffix=".png", prefix="anydoor-", dir=self.out_dir)
        with os.fdopen(fd, "wb") as f:
            f.write(result.to_png())
        return Path(name)
