"""The request's parameters: every user parameter of a generation besides its images, defined once.

:class:`GenerationParams` is frozen; each field carries its type, default, bounds or choices and one description
in its metadata (:mod:`model.spec.fields`). Every surface is generated from it and never restates it: the
``/predict`` form and its OpenAPI schema, the Cog predictor's inputs, the ``anydoor generate`` flags, the batch
manifest and the README table. Validation happens here and only here (``__post_init__``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from model.errors import ErrorCode, InputError
from model.spec.fields import INT64_MAX, FieldSpec, spec_field, specs_of

SEED_MAX = INT64_MAX
# The sampler registry's names and descriptions (model.diffusion.samplers builds its functions for exactly these
# keys, in this order; a test checks): kept here so that the spec needs no torch.
SAMPLER_DESCRIPTIONS: dict[str, str] = {
    "ddim": "DDIM, eta 0 (Song et al. 2020): upstream's sampler",
    "dpmpp_2m": "DPM-Solver++(2M) (Lu et al. 2022): similar quality in fewer steps",
}
# The answer's image formats: media type and file extension (model.pipeline.result encodes them).
OUTPUT_FORMATS: dict[str, tuple[str, str]] = {
    "png": ("image/png", ".png"), "jpeg": ("image/jpeg", ".jpg"), "webp": ("image/webp", ".webp")}
# Kept as a name: older code and docs call the field spec a ParamSpec.
ParamSpec = FieldSpec


@dataclass(frozen=True)
class GenerationParams:
    """Every parameter of one generation besides its images. Frozen; invalid values raise :class:`InputError`."""

    steps: int = spec_field(
        50, "Denoising steps, exactly this many (any count from 1 to 1000). About 20 suffice for `dpmpp_2m`.", "int",
        ge=1, le=1000, basic=True)
    sampler: str = spec_field(
        "ddim", "The sampler: " + "; ".join(f"`{name}`: {text}" for name, text in SAMPLER_DESCRIPTIONS.items())
        + ".", "choice", choices=tuple(SAMPLER_DESCRIPTIONS))
    guidance_scale: float = spec_field(
        4.5, "Classifier-free guidance scale; 1 turns the unconditional branch off (half the work).", "float",
        ge=0.0, le=30.0, basic=True)
    control_strength: float = spec_field(
        1.0, "Scale of the ControlNet residuals (the detail collage).", "float", ge=0.0, le=2.0)
    shape_control: bool = spec_field(
        False, "Follow the target mask's shape instead of filling its bounding box.", "bool")
    seed: int | None = spec_field(
        None, "Random seed; the same inputs, parameters and seed give the same PNG, byte for byte. Left out: a "
        "random one, returned with the result.", "int", ge=0, le=SEED_MAX, int64=True, basic=True)
    reference_expand_ratio: float = spec_field(
        1.3, "How much the object's crop is enlarged around its mask before it goes to DINOv2 (upstream draws it "
        "at random).", "float", ge=1.0, le=3.0)
    target_box_expand_ratio: float = spec_field(
        1.1, "How much the target box is enlarged around the target region (upstream: random).", "float",
        ge=1.0, le=3.0)
    crop_expand_ratio: float = spec_field(
        2.0, "How much larger than the target box the square background crop is (upstream: random).", "float",
        ge=1.0, le=4.0)
    refine_reference_mask: bool = spec_field(
        False, "Refine the reference's mask with upstream's demo segmentation network before anything else "
        "(needs the refiner's weights: `ANYDOOR_MASK_REFINE_WEIGHTS` for the service and Cog, "
        "`--mask-refine-weights` for `anydoor generate` and `anydoor batch`).", "bool")
    keep_background: bool = spec_field(
        False, "Keep the background inside the crop: from `blend_start` of the steps on, the latent outside the "
        "(dilated) target region is replaced by the background's, noised to the step (Blended Latent Diffusion).",
        "bool")
    blend_start: float = spec_field(
        0.25, "With `keep_background`: the fraction of the steps after which the background is re-imposed.",
        "float", ge=0.0, le=1.0)
    feather: int = spec_field(
        0, "Feathered paste: pixels over which the generated crop fades into the background at the target box's "
        "edge (0: a hard edge, as upstream). Outside the box the background stays byte-identical.", "int",
        ge=0, le=64)
    harmonize: float = spec_field(
        0.0, "Harmonising pass: after pasting, the crop is noised to this fraction of the schedule and denoised "
        "again with the same conditioning and the background kept (SDEdit); 0 turns it off.", "float",
        ge=0.0, le=0.3)
    num_outputs: int = spec_field(
        1, "Candidates to generate, run together as one batch (each counts like a region against the batch "
        "size); candidate k uses seed `seed + k`, so any one is reproduced by a single request with its seed "
        "(within one level of 8 bits: a batch rounds differently). They are ranked by identity score, best first; "
        "an image answer is the best one.", "int", ge=1, le=8,
        basic=True)
    output_format: str = spec_field(
        "png", "The answer's image format: `png` (lossless), `jpeg` or `webp` (lossy, `output_quality`; several "
        "times smaller and faster to encode for large backgrounds). The seed and the demo label are in its "
        "metadata (PNG text chunks; EXIF for JPEG and WebP).", "choice", choices=tuple(OUTPUT_FORMATS))
    output_quality: int = spec_field(
        90, "With `output_format` `jpeg` or `webp`: the encoder's quality, 1 (smallest) to 100 (best); ignored "
        "for `png`.", "int", ge=1, le=100)

    def __post_init__(self) -> None:
        for spec in param_specs():
            object.__setattr__(self, spec.name, spec.check(getattr(self, spec.name)))

    @classmethod
    def from_text(cls, values: Mapping[str, str]) -> GenerationParams:
        """Parse parameters that arrive as text; a name that is not a parameter is an ``invalid_parameter``."""
        specs = {spec.name: spec for spec in param_specs()}
        parsed: dict[str, Any] = {}
        for name, text in values.items():
            if name not in specs:
                raise InputError(name, ErrorCode.INVALID_PARAMETER, "is not a generation parameter")
            parsed[name] = specs[name].parse(text)
        return cls(**parsed)

    def with_seed(self, seed: int) -> GenerationParams:
        return replace(self, seed=seed)

    def changed(self) -> dict[str, Any]:
        """The parameters that differ from their defaults (for logs)."""
        return {s.name: getattr(self, s.name) for s in param_specs() if getattr(self, s.name) != s.default}


def param_specs() -> tuple[FieldSpec, ...]:
    """The spec of every :class:`GenerationParams` field, in declaration order."""
    return _SPECS


_SPECS = specs_of(GenerationParams)
PARAM_NAMES = tuple(spec.name for spec in _SPECS)
