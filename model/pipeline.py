"""AnyDoorPipeline: images in, the background with the object inserted out.

Every result is reproducible from ``(inputs, parameters, seed)``: the three box-expansion ratios are parameters
with fixed defaults (upstream draws them at random), and the initial noise comes from a CPU ``torch.Generator``
seeded with ``seed``, so the same seed gives the same noise on any device.

The work is split so that several requests can share one batch: :meth:`AnyDoorPipeline.prepare` validates and
preprocesses one request into a :class:`Job` (one item per target region), :meth:`AnyDoorPipeline.run_jobs`
encodes, samples and decodes any number of jobs with the same step count and sampler together (each keeps its own
noise, guidance scale and control strength), and pastes every region back into its own background.
"""

from __future__ import annotations

import io
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from .anydoor import AnyDoorModel, resolve_device
from .config import AnyDoorConfig, tiny_config
from .errors import InputError
from .imageio import DEFAULT_MAX_PIXELS, ImageSource, load_image, load_mask, load_reference
from .postprocess import paste_back
from .preprocess import (
    DEFAULT_CROP_EXPAND_RATIO,
    DEFAULT_REFERENCE_EXPAND_RATIO,
    DEFAULT_TARGET_BOX_EXPAND_RATIO,
    PreparedInputs,
    prepare_inputs,
)
from .regions import Box, boxes_to_masks, split_mask
from .sampler import ddim_sample, dpmpp_2m_sample

DEFAULT_STEPS = 50
DEFAULT_GUIDANCE_SCALE = 4.5
DEFAULT_CONTROL_STRENGTH = 1.0
# Inclusive bounds of the user-facing parameters; the service and the Cog predictor publish the same ones.
PARAM_LIMITS: dict[str, tuple[float, float]] = {
    "steps": (1, 1000),
    "guidance_scale": (0.0, 30.0),
    "control_strength": (0.0, 2.0),
    "seed": (0, 2**63 - 1),
    "reference_expand_ratio": (1.0, 3.0),
    "target_box_expand_ratio": (1.0, 3.0),
    "crop_expand_ratio": (1.0, 4.0),
}
# "ddim": Song et al. 2020, eta 0 (upstream's sampler); "dpmpp_2m": DPM-Solver++(2M), as good in ~20 steps.
SAMPLERS = ("ddim", "dpmpp_2m")
STAGES = ("queue", "preprocess", "encode", "sample", "decode", "postprocess", "total")

ProgressFn = Callable[[int, int, int], None]


def check_param(name: str, value: Any, kind: type) -> Any:
    """Validate one user parameter against :data:`PARAM_LIMITS`; raise InputError naming it."""
    lo, hi = PARAM_LIMITS[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and not float(value).is_integer()):
        raise InputError(name, f"must be {'an integer' if kind is int else 'a number'}, got {value!r}",
                         code="invalid_parameter")
    if not np.isfinite(value) or not lo <= value <= hi:
        raise InputError(name, f"must be between {lo:g} and {hi:g}, got {value!r}", code="out_of_range")
    return kind(value)


@dataclass
class GenerationResult:
    image: Image.Image
    seed: int
    timings: dict[str, float]
    regions: int
    is_demo: bool = False

    def to_png(self) -> bytes:
        """The image as PNG bytes, with the seed (and a demo label where it applies) in text chunks."""
        info = PngImagePlugin.PngInfo()
        info.add_text("anydoor:seed", str(self.seed))
        if self.is_demo:
            info.add_text("anydoor:model", "DEMO (tiny random weights, not the AnyDoor model)")
        buf = io.BytesIO()
        self.image.save(buf, format="PNG", pnginfo=info)
        return buf.getvalue()


@dataclass(eq=False)  # identity semantics: a job is hashed by object, never compared by value
class Job:
    """One validated, preprocessed request: ``len(regions)`` items of a batch."""

    background: np.ndarray  # (H, W, 3) uint8
    regions: list[PreparedInputs]
    noise: torch.Tensor  # (R, 4, h, w) float32, on the CPU
    seed: int
    steps: int
    guidance_scale: float
    control_strength: float
    sampler: str = "ddim"
    timings: dict[str, float] = field(default_factory=dict)
    progress: ProgressFn | None = None
    should_cancel: Callable[[], bool] | None = None


class AnyDoorPipeline:
    def __init__(self, model: AnyDoorModel, *, is_demo: bool = False, weights_name: str = "",
                 max_batch: int = 8) -> None:
        if model.config.hint_size != 512:
            raise ValueError(f"the pipeline works on 512x512 crops; config.image_size must be 64, "
                             f"got {model.config.image_size}")
        self.model = model
        self.is_demo = is_demo
        self.weights_name = weights_name
        self.max_batch = max_batch  # most items (regions) per forward; guidance doubles it

    @classmethod
    def from_pretrained(
        cls,
        weights: str | Path,
        config: AnyDoorConfig | str | Path | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> AnyDoorPipeline:
        model = AnyDoorModel.from_checkpoint(weights, config=config, device=device, dtype=dtype)
        return cls(model, weights_name=Path(weights).name)

    @classmethod
    def demo(cls, device: str | torch.device | None = None) -> AnyDoorPipeline:
        """A tiny model with fixed random weights: exercises the whole path anywhere; its pictures are noise."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = AnyDoorModel(tiny_config())
        model = model.to(resolve_device(device)).eval().requires_grad_(False)
        return cls(model, is_demo=True, weights_name="demo (tiny random)")

    def compile_networks(self, **options: Any) -> AnyDoorPipeline:
        """``torch.compile`` the UNet and the ControlNet in place (their keys are unchanged).

        Off by default. Compilation happens on the first generation of each batch shape, so run a warm-up (the
        service's warm-up generation does) before measuring or serving."""
        self.model.model.diffusion_model.compile(**options)
        self.model.control_model.compile(**options)
        return self

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.compute_dtype

    # --- one request ---------------------------------------------------------------------------------------

    def __call__(
        self,
        reference: ImageSource,
        background: ImageSource,
        *,
        background_mask: ImageSource | None = None,
        boxes: Sequence[Box] | None = None,
        reference_mask: ImageSource | None = None,
        steps: int = DEFAULT_STEPS,
        sampler: str = "ddim",
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        control_strength: float = DEFAULT_CONTROL_STRENGTH,
        shape_control: bool = False,
        seed: int | None = None,
        initial_noise: torch.Tensor | None = None,
        reference_expand_ratio: float = DEFAULT_REFERENCE_EXPAND_RATIO,
        target_box_expand_ratio: float = DEFAULT_TARGET_BOX_EXPAND_RATIO,
        crop_expand_ratio: float = DEFAULT_CROP_EXPAND_RATIO,
        progress: ProgressFn | None = None,
        should_cancel: Callable[[], bool] | None = None,
        max_pixels: int | None = None,
    ) -> GenerationResult:
        """Insert the object of ``reference`` into every target region of ``background``.

        Targets: ``background_mask`` (each connected region gets the object) or ``boxes`` ((x, y, w, h) each).
        ``initial_noise`` (1 or R, 4, 64, 64) replaces the seeded noise for exact replays.
        """
        job = self.prepare(
            reference, background, background_mask=background_mask, boxes=boxes, reference_mask=reference_mask,
            steps=steps, sampler=sampler, guidance_scale=guidance_scale, control_strength=control_strength,
            shape_control=shape_control, seed=seed, initial_noise=initial_noise,
            reference_expand_ratio=reference_expand_ratio, target_box_expand_ratio=target_box_expand_ratio,
            crop_expand_ratio=crop_expand_ratio, progress=progress, should_cancel=should_cancel,
            max_pixels=max_pixels,
        )
        return self.run_jobs([job])[0]

    def prepare(
        self,
        reference: ImageSource,
        background: ImageSource,
        *,
        background_mask: ImageSource | None = None,
        boxes: Sequence[Box] | None = None,
        reference_mask: ImageSource | None = None,
        steps: int = DEFAULT_STEPS,
        sampler: str = "ddim",
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        control_strength: float = DEFAULT_CONTROL_STRENGTH,
        shape_control: bool = False,
        seed: int | None = None,
        initial_noise: torch.Tensor | None = None,
        reference_expand_ratio: float = DEFAULT_REFERENCE_EXPAND_RATIO,
        target_box_expand_ratio: float = DEFAULT_TARGET_BOX_EXPAND_RATIO,
        crop_expand_ratio: float = DEFAULT_CROP_EXPAND_RATIO,
        progress: ProgressFn | None = None,
        should_cancel: Callable[[], bool] | None = None,
        max_pixels: int | None = None,
    ) -> Job:
        """Validate parameters, decode the images and preprocess every target region (CPU only)."""
        start = time.perf_counter()
        steps = check_param("steps", steps, int)
        if sampler not in SAMPLERS:
            raise InputError("sampler", f"must be one of {', '.join(SAMPLERS)}, got {sampler!r}",
                             code="invalid_parameter")
        guidance_scale = check_param("guidance_scale", guidance_scale, float)
        control_strength = check_param("control_strength", control_strength, float)
        ratios = {
            name: check_param(name, value, float)
            for name, value in (("reference_expand_ratio", reference_expand_ratio),
                                ("target_box_expand_ratio", target_box_expand_ratio),
                                ("crop_expand_ratio", crop_expand_ratio))
        }
        seed = secrets.randbits(63) if seed is None else check_param("seed", seed, int)
        limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels

        ref_rgb, ref_mask = load_reference(reference, reference_mask, max_pixels=limit)
        bg = load_image(background, field="background", max_pixels=limit)
        height, width = bg.shape[:2]
        if (background_mask is None) == (boxes is None or len(boxes) == 0):
            raise InputError("background_mask", "give exactly one target: a background_mask or one or more boxes",
                             code="missing_target" if background_mask is None else "conflicting_target")
        if background_mask is not None:
            mask = load_mask(background_mask, field="background_mask", size=(height, width), max_pixels=limit)
            targets = split_mask(mask)
        else:
            assert boxes is not None
            targets = boxes_to_masks(boxes, (height, width))

        regions = [
            prepare_inputs(ref_rgb, ref_mask, bg, target, shape_control=bool(shape_control), **ratios)
            for target in targets
        ]
        noise = self._initial_noise(seed, len(regions), initial_noise)
        job = Job(bg, regions, noise, seed, steps, guidance_scale, control_strength, sampler,
                  progress=progress, should_cancel=should_cancel)
        job.timings["preprocess"] = time.perf_counter() - start
        return job

    def _initial_noise(self, seed: int, count: int, given: torch.Tensor | None) -> torch.Tensor:
        size = self.model.config.image_size
        shape = (count, self.model.config.latent_channels, size, size)
        if given is None:
            generator = torch.Generator().manual_seed(seed)
            return torch.randn(shape, generator=generator)
        given = torch.as_tensor(given, dtype=torch.float32).cpu()
        if given.ndim != 4 or given.shape[1:] != shape[1:] or given.shape[0] not in (1, count):
            raise InputError("initial_noise", f"expected shape (1 or {count}, {', '.join(map(str, shape[1:]))}), "
                             f"got {tuple(given.shape)}", code="invalid_parameter")
        return given.expand(shape).clone()

    # --- a batch of jobs -----------------------------------------------------------------------------------

    def run_jobs(self, jobs: Sequence[Job]) -> list[GenerationResult]:
        """Encode, sample and decode the regions of ``jobs`` together (chunks of ``max_batch`` items)."""
        if not jobs:
            return []
        schedules = {(job.steps, job.sampler) for job in jobs}
        if len(schedules) != 1:
            raise ValueError(f"jobs in one batch must share the step count and sampler, got {sorted(schedules)}")
        items = [(job, i) for job in jobs for i in range(len(job.regions))]
        decoded: dict[tuple[int, int], np.ndarray] = {}
        for start in range(0, len(items), self.max_batch):
            chunk = items[start:start + self.max_batch]
            for (job, i), image in zip(chunk, self._generate(chunk), strict=True):
                decoded[(id(job), i)] = image
        results = []
        for job in jobs:
            t0 = time.perf_counter()
            out = job.background
            for i, prepared in enumerate(job.regions):
                out = paste_back(decoded[(id(job), i)], out, prepared)
            job.timings["postprocess"] = time.perf_counter() - t0
            job.timings["total"] = sum(job.timings.get(k, 0.0) for k in STAGES if k not in ("queue", "total"))
            results.append(GenerationResult(Image.fromarray(out), job.seed, dict(job.timings), len(job.regions),
                                            self.is_demo))
        return results

    @torch.no_grad()
    def _generate(self, chunk: Sequence[tuple[Job, int]]) -> list[np.ndarray]:
        model, dev = self.model, self.device
        jobs = list(dict.fromkeys(job for job, _ in chunk))  # distinct jobs, in order
        t0 = time.perf_counter()
        refs = torch.stack([torch.from_numpy(job.regions[i].ref) for job, i in chunk]).permute(0, 3, 1, 2)
        hints = torch.stack([torch.from_numpy(job.regions[i].hint) for job, i in chunk]).permute(0, 3, 1, 2)
        cond = model.encode_reference(refs.contiguous())  # (N, 257, D)
        guided = model.encode_hint(hints.contiguous().to(dev))  # (N, mc, 64, 64)
        n = len(chunk)
        guidance = torch.tensor([job.guidance_scale for job, _ in chunk], device=dev).view(-1, 1, 1, 1)
        control = torch.tensor([job.control_strength for job, _ in chunk], device=dev)
        guided_all = all(job.guidance_scale != 1.0 for job, _ in chunk)
        unguided_all = all(job.guidance_scale == 1.0 for job, _ in chunk)
        x_T = torch.stack([job.noise[i] for job, i in chunk]).to(dev)
        self._add_time(jobs, "encode", time.perf_counter() - t0)

        if guided_all:
            # Both guidance branches in one forward: [uncond | cond] along the batch.
            context = torch.cat([model.uncond_tokens(n), cond])
            guided2, control2 = torch.cat([guided, guided]), torch.cat([control, control])

            def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                out = model.predict_noise(torch.cat([x, x]), torch.cat([t, t]), context, control_scale=control2,
                                          guided_hint=guided2)
                uncond, cond_eps = out.chunk(2)
                return uncond + guidance * (cond_eps - uncond)
        else:
            # Guidance scale 1 is the conditional branch alone (as upstream); with a mix, rows at 1 still get
            # exactly that from the combination below.
            uncond_tokens = model.uncond_tokens(n)

            def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                cond_eps = model.predict_noise(x, t, cond, control_scale=control, guided_hint=guided)
                if unguided_all:
                    return cond_eps
                uncond = model.predict_noise(x, t, uncond_tokens, control_scale=control, guided_hint=guided)
                return uncond + guidance * (cond_eps - uncond)

        def progress(step: int, total: int, t: int) -> None:
            for job in jobs:
                if job.progress is not None:
                    job.progress(step, total, t)

        def should_cancel() -> bool:
            # A batch stops only when every job in it is cancelled; results of cancelled jobs are dropped.
            return all(job.should_cancel is not None and job.should_cancel() for job in jobs)

        t0 = time.perf_counter()
        sample = dpmpp_2m_sample if jobs[0].sampler == "dpmpp_2m" else ddim_sample
        latents = sample(eps, x_T, model.alphas_cumprod, jobs[0].steps, progress=progress, should_cancel=should_cancel)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        self._add_time(jobs, "sample", time.perf_counter() - t0)

        t0 = time.perf_counter()
        images = model.decode_latent(latents).permute(0, 2, 3, 1).cpu().numpy()  # (N, 512, 512, 3)
        self._add_time(jobs, "decode", time.perf_counter() - t0)
        return list(images)

    @staticmethod
    def _add_time(jobs: Sequence[Job], stage: str, seconds: float) -> None:
        for job in jobs:
            job.timings[stage] = job.timings.get(stage, 0.0) + seconds
