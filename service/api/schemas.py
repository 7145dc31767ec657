"""Response bodies, as the OpenAPI schema publishes them. (The multipart request is declared on the route.)"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from model.errors import ErrorCode


class FieldError(BaseModel):
    error: ErrorCode = Field(description="Stable machine-readable code, e.g. `out_of_range`.")
    field: str | None = Field(description="The request field at fault.")
    message: str


class ErrorBody(BaseModel):
    """Every rejection: a stable `error` code, the field at fault where there is one, a readable message."""

    error: ErrorCode = Field(description="Stable machine-readable code (the README's error table).",
                             examples=["out_of_range"])
    field: str | None = Field(description="The request field at fault, if any.", examples=["steps"])
    message: str = Field(examples=["must be between 1 and 1000, got 5000"])
    request_id: str | None = Field(description="Same as the `X-Request-ID` response header.")
    errors: list[FieldError] | None = Field(default=None, description="All problems, when there are several.")


class Timings(BaseModel):
    """Milliseconds per stage, as in the `Server-Timing` header."""

    queue: float = Field(description="Waiting in the GPU queue.")
    preprocess: float = Field(description="Decoding and validating the images, cropping, the collage hint.")
    encode: float = Field(description="DINOv2 ID tokens and the ControlNet hint encoding.")
    sample: float = Field(description="Denoising (the sampler's steps).")
    decode: float = Field(description="VAE decoding.")
    postprocess: float = Field(description="Pasting back into the background (feather, harmonize).")
    score: float = Field(description="The identity and background scores (one DINOv2 pass over the regions).")
    output: float = Field(description="Encoding the answer's image(s) in `output_format` (PNG, JPEG or WebP).")
    total: float = Field(description="From the end of the upload to the response.")


class ScoresBody(BaseModel):
    """How faithful the result is. With demo weights the identity is meaningless."""

    identity: float = Field(description="Mean over the regions of `region_identity`: the ranking score.")
    region_identity: list[float] = Field(
        description="Per region, in region order: the cosine similarity in [-1, 1] of DINOv2's class-token "
                    "features of the reference as the model sees it (masked, on white, 224x224) and of the "
                    "generated region (its box cut from the result, padded with white to a square).")
    background_psnr: float | None = Field(
        description="PSNR in dB (peak 255) of the result against the background over every pixel outside the "
                    "target regions (the boxes, or the mask's regions); null where those pixels are unchanged.")


class CandidateBody(BaseModel):
    """One candidate of a `num_outputs` > 1 request."""

    image: str = Field(description="The candidate's image in `output_format`, base64-encoded.")
    seed: int = Field(description="Its seed: a `num_outputs=1` request with this seed reproduces it.")
    scores: ScoresBody | None


class PredictResponse(BaseModel):
    """The JSON variant of a /predict answer (request it with `Accept: application/json`)."""

    image: str = Field(description="The image in `output_format` (PNG by default), base64-encoded (standard "
                       "alphabet, padded).")
    media_type: Literal["image/png", "image/jpeg", "image/webp"] = Field(
        "image/png", description="The image's media type, following `output_format`.")
    width: int = Field(description="Equal to the background's width.")
    height: int = Field(description="Equal to the background's height.")
    seed: int = Field(description="The seed used; send it back to reproduce the image.")
    regions: int = Field(description="How many target regions the object was inserted into.")
    boxes: list[list[int]] = Field(description="Each region's target box `[x, y, w, h]` in background pixels, in "
                                   "region order.")
    demo: bool = Field(description="True in demo mode: the image comes from a tiny random model, not AnyDoor.")
    request_id: str
    timings_ms: Timings
    scores: ScoresBody | None = Field(default=None, description="The result's identity and background scores.")
    candidates: list[CandidateBody] | None = Field(
        default=None, description="With `num_outputs` > 1: every candidate, best first (highest `scores.identity`); "
        "the top-level `image`, `seed` and `scores` are the first one's. Null for a single output.")


class ModelInfo(BaseModel):
    weights: str
    device: str
    dtype: str
    demo: bool
    mask_refiner: bool = Field(description="Whether `refine_reference_mask` is available.")


class LiveResponse(BaseModel):
    status: Literal["alive"] = "alive"


class ReadyResponse(BaseModel):
    status: Literal["ready", "starting", "setup_failed", "draining", "stopped"]
    model: ModelInfo | None = Field(default=None, description="Once loaded.")
    queue_depth: int
    max_queue: int
    error: str | None = Field(default=None, description="Why setup failed.")


class CogSetup(BaseModel):
    started_at: str | None
    completed_at: str | None
    status: Literal["starting", "succeeded", "failed"]
    logs: str


class CogHealth(BaseModel):
    """The body of Cog's `GET /health-check`."""

    status: Literal["STARTING", "READY", "BUSY", "SETUP_FAILED"]
    setup: CogSetup
