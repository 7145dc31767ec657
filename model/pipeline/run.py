"""AnyDoorPipeline: images in, the background with the object inserted out.

Every result is reproducible from ``(inputs, parameters, seed)``: the three box-expansion ratios are parameters
with fixed defaults (upstream draws them at random), and the initial noise comes from a CPU ``torch.Generator``
seeded with ``seed``, so the same seed gives the same noise on any device.

The work is split so that several requests can share one batch: :meth:`AnyDoorPipeline.prepare` decodes and
preprocesses one request (:class:`GenerationInputs` + :class:`GenerationParams`) into a frozen :class:`Job` (one
item per target region) on the CPU; :meth:`AnyDoorPipeline.run` encodes, samples and decodes any number of jobs
with the same :attr:`Job.batch_key` together (each keeps its own noise, guidance scale and control strength) and
pastes every region back into its own background. Progress and cancellation are arguments of ``run``.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from model.config import AnyDoorConfig, released_config, tiny_config
from model.diffusion.guidance import guided_denoiser
from model.diffusion.samplers import SAMPLERS, ProgressFn
from model.diffusion.schedule import ddim_timesteps
from model.errors import ErrorCode, InputError
from model.imaging.decode import ImageSource, load_image, load_mask, load_reference
from model.imaging.placement import Placement, place_boxes
from model.imaging.postprocess import crop_like, paste_back
from model.imaging.preprocess import MIN_MASK_PIXELS, PreparedInputs, bbox_from_mask, prepare_inputs
from model.imaging.regions import box_mask, check_boxes, split_mask
from model.nn.anydoor import AnyDoorModel, resolve_device
from model.nn.mask_refine import MaskRefiner
from model.pipeline.job import Job, freeze
from model.pipeline.params import PARAM_NAMES, GenerationInputs, GenerationParams
from model.pipeline.result import STAGES, GenerationResult, Scores, rank_candidates
from model.pipeline.scores import background_psnr, identity_scores, pack_targets, region_view, unpack_targets
from model.spec.inputs import check_reference_count
from model.spec.limits import Limits
from model.spec.params import SEED_MAX

CancelFn = Callable[[], bool]
DECODE_BATCH = 2  # latents decoded together


class _ConfigOnly:
    """Stands in for the networks in :meth:`AnyDoorPipeline.preparer`: the config, nothing to run."""

    def __init__(self, config: AnyDoorConfig) -> None:
        self.config = config


class AnyDoorPipeline:
    def __init__(self, model: AnyDoorModel, *, is_demo: bool = False, weights_name: str = "",
                 max_batch_items: int = 8, mask_refiner: MaskRefiner | None = None) -> None:
        if model.config.hint_size != 512:
            raise ValueError(f"the pipeline works on 512x512 crops; config.image_size must be 64, "
                             f"got {model.config.image_size}")
        self.model = model
        self.is_demo = is_demo
        self.weights_name = weights_name
        # Most regions in one forward of the networks (guidance doubles the rows); larger batches run in chunks.
        self.max_batch_items = max_batch_items
        # Upstream demo's reference-mask refiner, for requests with refine_reference_mask (None: not available).
        self.mask_refiner = mask_refiner
        # How the surface that built this pipeline loads a refiner, for the refiner_unavailable message.
        self.refiner_hint = "give mask_refine_weights to load_pipeline"

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

    @classmethod
    def preparer(cls, config: AnyDoorConfig | None = None, *, refiner_hint: str | None = None) -> AnyDoorPipeline:
        """A pipeline without networks that can only :meth:`prepare`: for CPU workers that prepare jobs which a
        GPU worker elsewhere runs (``anydoor batch --engine ray``). Its jobs are the full pipeline's (the same
        crops, boxes and initial noise, which need only the config's latent shape); ``run`` is not available, nor
        ``refine_reference_mask`` (no refiner: prepare those where the refiner is loaded)."""
        pipe = cls.__new__(cls)
        pipe.model = _ConfigOnly(config or released_config())  # type: ignore[assignment]
        pipe.is_demo, pipe.weights_name, pipe.max_batch_items, pipe.mask_refiner = False, "", 8, None
        pipe.refiner_hint = refiner_hint or "prepare it where the refiner is loaded"
        return pipe

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
        reference: ImageSource | Sequence[ImageSource],
        background: ImageSource,
        *,
        background_mask: ImageSource | None = None,
        boxes: Sequence[tuple[int, int, int, int]] | None = None,
        reference_mask: ImageSource | Sequence[ImageSource | None] | None = None,
        placement: Placement | None = None,
        placement_area: ImageSource | None = None,
        initial_noise: torch.Tensor | None = None,
        progress: ProgressFn | None = None,
        should_cancel: CancelFn | None = None,
        max_pixels: int | None = None,
        limits: Limits | None = None,
        **params: Any,
    ) -> GenerationResult:
        """Insert the object of ``reference`` into every target region of ``background``: the keyword call.

        Targets: ``background_mask`` (each connected region gets the object), ``boxes`` ((x, y, w, h) each) or a
        ``placement`` in ``placement_area``. ``reference`` (and ``reference_mask``) may be a list, one per region.
        ``params`` are :class:`GenerationParams` fields (``steps``, ``seed``, ...). ``initial_noise``
        (1 or R, 4, 64, 64) replaces the seeded noise for exact replays.
        """
        unknown = sorted(set(params) - set(PARAM_NAMES))
        if unknown:
            raise TypeError(f"unknown generation parameters {unknown}; known: {', '.join(PARAM_NAMES)}")
        inputs = GenerationInputs(reference, background, reference_mask, background_mask,  # type: ignore[arg-type]
                                  tuple(boxes) if boxes is not None else None, placement, placement_area)
        return self.generate(inputs, GenerationParams(**params), initial_noise=initial_noise, progress=progress,
                             should_cancel=should_cancel, max_pixels=max_pixels, limits=limits)

    def generate(self, inputs: GenerationInputs, params: GenerationParams, *,
                 initial_noise: torch.Tensor | None = None, progress: ProgressFn | None = None,
                 should_cancel: CancelFn | None = None, max_pixels: int | None = None,
                 limits: Limits | None = None) -> GenerationResult:
        """:meth:`prepare_candidates` and :meth:`run` for one request: its result, or with ``num_outputs`` > 1 the
        best candidate, carrying all of them best first in ``candidates``."""
        jobs = self.prepare_candidates(inputs, params, initial_noise=initial_noise, max_pixels=max_pixels,
                                       limits=limits)
        return rank_candidates(self.run(jobs, progress=progress, should_cancel=should_cancel))

    def prepare_candidates(self, inputs: GenerationInputs, params: GenerationParams, **options: Any) -> list[Job]:
        """The ``params.num_outputs`` jobs of one request (:meth:`prepare`'s options): candidate k is exactly the
        job of the same request with seed ``seed + k``. They share the decoded background and the preprocessed
        regions (no copy), except where the regions depend on the seed (a placement without its own seed)."""
        first = self.prepare(inputs, params, **options)
        jobs = [first]
        for k in range(1, params.num_outputs):
            seed = (first.seed + k) % (SEED_MAX + 1)
            if inputs.placement is not None and inputs.placement.seed is None:
                jobs.append(self.prepare(inputs, params.with_seed(seed), **options))  # its own boxes
            else:
                noise = self._initial_noise(seed, len(first.regions), options.get("initial_noise"))
                jobs.append(dataclasses.replace(first, params=first.params.with_seed(seed), noise=noise))
        return jobs

    def prepare(self, inputs: GenerationInputs, params: GenerationParams, *,
                initial_noise: torch.Tensor | None = None, limits: Limits | None = None,
                max_pixels: int | None = None, max_regions: int | None = None, refiner_hint: str | None = None) -> Job:
        """Decode the images and preprocess every target region (CPU only, any thread).

        ``limits`` (default: :class:`Limits`, the service's defaults) bound every image (its pixels, checked from
        its header) and the number of target regions, counted before anything is built for them; ``max_pixels``
        and ``max_regions`` override one limit. ``refiner_hint`` says, in a ``refiner_unavailable`` error, how the
        caller's surface loads a refiner (a flag, a setting)."""
        start = time.perf_counter()
        seed = secrets.randbits(63) if params.seed is None else params.seed
        limits = (limits or Limits()).with_(
            **{k: v for k, v in (("max_pixels", max_pixels), ("max_regions", max_regions)) if v is not None})
        limit, max_regions = limits.max_pixels, limits.max_regions
        inputs.check(max_regions)  # targets and counts, before any decoding
        references, reference_masks = inputs.references, inputs.reference_masks
        if params.refine_reference_mask and self.mask_refiner is None:
            raise InputError("refine_reference_mask", ErrorCode.REFINER_UNAVAILABLE,
                             f"no mask refiner is loaded ({refiner_hint or self.refiner_hint})")
        objects = [self._reference(ref, mask, params, limit) for ref, mask in zip(references, reference_masks,
                                                                                   strict=True)]
        bg = load_image(inputs.background, field="background", max_pixels=limit)
        height, width = bg.shape[:2]
        targets: Iterable[np.ndarray]
        count: int
        if inputs.background_mask is not None:
            mask = load_mask(inputs.background_mask, field="background_mask", size=(height, width), max_pixels=limit)
            found = split_mask(mask, max_regions=max_regions)
            del mask
            targets, count = found, len(found)
        else:
            if inputs.placement is not None:
                assert inputs.placement_area is not None
                area = load_mask(inputs.placement_area, field="placement_area", size=(height, width),
                                 max_pixels=limit)
                wanted: Sequence[tuple[int, int, int, int]] = place_boxes(
                    area, inputs.placement, inputs.placement.seed_for(seed), max_regions=max_regions)
                del area
            else:
                assert inputs.boxes is not None
                wanted = inputs.boxes
            checked = check_boxes(wanted, (height, width), max_regions=max_regions)
            # One full-size mask at a time: a region keeps only its crops once prepared.
            targets, count = (box_mask(box, (height, width)) for box in checked), len(checked)
        check_reference_count(len(objects), count)

        ratios = {"reference_expand_ratio": params.reference_expand_ratio,
                  "target_box_expand_ratio": params.target_box_expand_ratio,
                  "crop_expand_ratio": params.crop_expand_ratio}
        regions: list[PreparedInputs] = []
        boxes: list[tuple[int, int, int, int]] = []
        union = np.zeros((height, width), dtype=bool)  # where the regions are: the background score skips it
        for index, target in enumerate(targets):
            ref_rgb, ref_mask = objects[index if len(objects) > 1 else 0]
            regions.append(prepare_inputs(ref_rgb, ref_mask, bg, target, shape_control=params.shape_control, **ratios))
            boxes.append(_xywh(bbox_from_mask(target)))
            union |= target
        noise = self._initial_noise(seed, len(regions), initial_noise)
        return Job(params.with_seed(seed), freeze(bg), tuple(regions), tuple(boxes), noise,
                   time.perf_counter() - start, pack_targets(union))

    def _reference(self, reference: ImageSource, mask: ImageSource | None, params: GenerationParams,
                   max_pixels: int) -> tuple[np.ndarray, np.ndarray]:
        """One reference decoded (RGB, bool mask), its mask refined when the request asks for it."""
        ref_rgb, ref_mask = load_reference(reference, mask, max_pixels=max_pixels)
        if params.refine_reference_mask:
            assert self.mask_refiner is not None
            refined = self.mask_refiner(ref_rgb, ref_mask)  # as upstream's demo: the refined mask replaces it
            if int(np.count_nonzero(refined)) < MIN_MASK_PIXELS:
                raise InputError("reference_mask", ErrorCode.MASK_TOO_SMALL,
                                 "the refined reference mask is (nearly) empty; send it without refinement")
            ref_mask = refined
        return ref_rgb, ref_mask

    def _initial_noise(self, seed: int, count: int, given: torch.Tensor | None) -> torch.Tensor:
        size = self.model.config.image_size
        shape = (count, self.model.config.latent_channels, size, size)
        if given is None:
            generator = torch.Generator().manual_seed(seed)
            return torch.randn(shape, generator=generator)
        given = torch.as_tensor(given, dtype=torch.float32).cpu()
        if given.ndim != 4 or given.shape[1:] != shape[1:] or given.shape[0] not in (1, count):
            raise InputError("initial_noise", ErrorCode.INVALID_PARAMETER,
                             f"expected shape (1 or {count}, {', '.join(map(str, shape[1:]))}), "
                             f"got {tuple(given.shape)}")
        return given.expand(shape).clone()

    # --- a batch of jobs -----------------------------------------------------------------------------------

    def run(self, jobs: Sequence[Job], *, progress: ProgressFn | None = None,
            should_cancel: CancelFn | None = None) -> list[GenerationResult]:
        """Encode, sample and decode the regions of ``jobs`` together, in chunks of ``max_batch_items`` regions.

        All jobs must share one :attr:`Job.batch_key`. ``progress(step, total, t)`` is called after every
        denoising step of every chunk; ``should_cancel()`` is checked before each step and stops the whole batch
        with :class:`~model.errors.Cancelled`. Each result carries its own timings: its preprocessing and
        postprocessing, and the encode/sample/decode time of the chunks its regions ran in. Jobs with
        ``harmonize`` get a second, partial pass over their pasted crops (grouped by strength).
        """
        if not jobs:
            return []
        keys = {job.batch_key for job in jobs}
        if len(keys) != 1:
            raise ValueError(f"jobs in one batch must share the step count and sampler, got {sorted(keys)}")
        stage_s: dict[int, dict[str, float]] = {id(job): {"preprocess": job.preprocess_s} for job in jobs}
        items = [(job, i) for job in jobs for i in range(len(job.regions))]
        decoded = self._pass(items, stage_s, progress, should_cancel)
        pasted = {id(job): self._paste(job, decoded, stage_s) for job in jobs}

        for strength in sorted({job.params.harmonize for job in jobs if job.params.harmonize > 0}):
            group = [job for job in jobs if job.params.harmonize == strength]
            items = [(job, i) for job in group for i in range(len(job.regions))]
            # SDEdit over the pasted result: each region's crop of it, noised part-way, denoised again.
            decoded = self._pass(items, stage_s, None, should_cancel, redo=pasted)
            for job in group:
                pasted[id(job)] = self._paste(job, decoded, stage_s)

        scores = self._score(jobs, pasted, stage_s)
        results = []
        for job in jobs:
            timings = stage_s[id(job)]
            timings["total"] = sum(timings.get(stage, 0.0) for stage in STAGES)
            results.append(GenerationResult(Image.fromarray(pasted[id(job)]), job.seed, timings, len(job.regions),
                                            self.is_demo, job.boxes, scores[id(job)]))
        return results

    def _score(self, jobs: Sequence[Job], pasted: dict[int, np.ndarray], stage_s: dict[int, dict[str, float]]
               ) -> dict[int, Scores]:
        """Every job's :class:`Scores`: one identity-encoder pass over all regions of the batch (references and
        generated crops together), and the background PSNR of each job; the time is each job's ``score`` stage."""
        t0 = time.perf_counter()
        size = self.model.config.dino.input_size
        items = [(job, i) for job in jobs for i in range(len(job.regions))]
        identity: list[float] = []
        for start in range(0, len(items), self.max_batch_items):
            chunk = items[start:start + self.max_batch_items]
            identity += identity_scores(self.model.embed_images, [job.regions[i].ref_u8 for job, i in chunk],
                                        [region_view(pasted[id(job)], job.boxes[i], size) for job, i in chunk])
        scores, at = {}, 0
        for job in jobs:
            count = len(job.regions)
            targets = (unpack_targets(job.targets, job.background.shape[:2]) if job.targets is not None
                       else np.zeros(job.background.shape[:2], dtype=bool))
            scores[id(job)] = Scores(tuple(identity[at:at + count]),
                                     background_psnr(pasted[id(job)], job.background, targets))
            at += count
        share = (time.perf_counter() - t0) / len(jobs)
        for job in jobs:
            stage_s[id(job)]["score"] = share
        return scores

    def _pass(self, items: Sequence[tuple[Job, int]], stage_s: dict[int, dict[str, float]],
              progress: ProgressFn | None, should_cancel: CancelFn | None,
              redo: dict[int, np.ndarray] | None = None) -> dict[tuple[int, int], np.ndarray]:
        """One generation over ``items`` in chunks: the decoded crop of every item, by (id(job), region)."""
        decoded: dict[tuple[int, int], np.ndarray] = {}
        for start in range(0, len(items), self.max_batch_items):
            chunk = items[start:start + self.max_batch_items]
            images, seconds = self._generate(chunk, progress, should_cancel, redo)
            for (job, i), image in zip(chunk, images, strict=True):
                decoded[(id(job), i)] = image
            for job in dict.fromkeys(job for job, _ in chunk):
                for stage, value in seconds.items():
                    stage_s[id(job)][stage] = stage_s[id(job)].get(stage, 0.0) + value
        return decoded

    @staticmethod
    def _paste(job: Job, decoded: dict[tuple[int, int], np.ndarray], stage_s: dict[int, dict[str, float]]
               ) -> np.ndarray:
        t0 = time.perf_counter()
        out = job.background
        for i, prepared in enumerate(job.regions):
            out = paste_back(decoded[(id(job), i)], out, prepared, feather=job.params.feather)
        stage_s[id(job)]["postprocess"] = stage_s[id(job)].get("postprocess", 0.0) + time.perf_counter() - t0
        return out

    @torch.no_grad()
    def _generate(self, chunk: Sequence[tuple[Job, int]], progress: ProgressFn | None,
                  should_cancel: CancelFn | None, redo: dict[int, np.ndarray] | None = None,
                  ) -> tuple[list[np.ndarray], dict[str, float]]:
        """Encode, sample and decode one chunk. With ``redo`` (a job's pasted image by id), the harmonising pass:
        start from each region's crop of that image, noised to the job's ``harmonize`` fraction of the schedule,
        with the background kept."""
        model, dev = self.model, self.device
        seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        refs = torch.stack([torch.from_numpy(job.regions[i].ref) for job, i in chunk]).permute(0, 3, 1, 2)
        hints = torch.stack([torch.from_numpy(job.regions[i].hint) for job, i in chunk]).permute(0, 3, 1, 2)
        cond = model.encode_reference(refs.contiguous())  # (N, 257, D)
        guided = model.encode_hint(hints.contiguous().to(dev))  # (N, mc, 64, 64)
        n = len(chunk)
        scale = torch.tensor([job.params.guidance_scale for job, _ in chunk], device=dev)
        control = torch.tensor([job.params.control_strength for job, _ in chunk], device=dev)
        # Per-row extras for one copy of the rows and for the [uncond | cond] pair, built once, not per step.
        extras = {1: (guided, control)}
        if bool((scale != 1).any()):
            extras[2] = (torch.cat([guided, guided]), torch.cat([control, control]))

        def predict(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, copies: int) -> torch.Tensor:
            hint_features, control_scale = extras[copies]
            return model.predict_noise(x, t, context, control_scale=control_scale, guided_hint=hint_features)

        eps = guided_denoiser(predict, cond, model.uncond_tokens(n), scale)
        params = chunk[0][0].params
        steps = params.steps
        first_step = 0
        if redo is None:
            x_T = torch.stack([job.noise[i] for job, i in chunk]).to(dev)
            keep = [job.params.keep_background for job, _ in chunk]
        else:
            # All jobs of a harmonising chunk share one strength: the last ceil(harmonize * steps) steps.
            first_step = steps - max(1, math.ceil(params.harmonize * steps))
            crops = np.stack([crop_like(redo[id(job)], job.regions[i]) for job, i in chunk])
            z = model.encode_image(torch.from_numpy(crops.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2))
            level = float(model.alphas_cumprod[ddim_timesteps(steps, model.alphas_cumprod.shape[0])[
                steps - 1 - first_step]])
            noise = torch.stack([_generator_noise(job, i, HARMONIZE_SEED, z.shape[1:]) for job, i in chunk]).to(dev)
            x_T = level**0.5 * z + (1 - level) ** 0.5 * noise
            keep = [True] * n
        after_step = self._keep_background(chunk, keep, steps, first_step, redo is not None) if any(keep) else None
        seconds["encode"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        sample = SAMPLERS[params.sampler].sample
        latents = sample(eps, x_T, model.alphas_cumprod, steps, progress=progress, should_cancel=should_cancel,
                         after_step=after_step, first_step=first_step)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds["sample"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        # The VAE decoder's activations at 512x512 are ~0.2 GB per image in float32: decoding a whole batch at
        # once would make peak memory grow with the regions of a request, for no speed gain worth it.
        images = np.concatenate([
            model.decode_latent(part).permute(0, 2, 3, 1).cpu().numpy()  # (n, 512, 512, 3)
            for part in latents.split(DECODE_BATCH)
        ])
        seconds["decode"] = time.perf_counter() - t0
        return list(images), seconds

    def _keep_background(self, chunk: Sequence[tuple[Job, int]], keep: Sequence[bool], steps: int, first_step: int,
                         from_start: bool) -> Callable[[torch.Tensor, int, float], torch.Tensor]:
        """The sampler's ``after_step`` that re-imposes the background outside each kept row's (dilated) region
        (Avrahami et al., "Blended Latent Diffusion", 2023; RePaint without resampling).

        The background crop is encoded once; after each step from ``blend_start`` of the way on, the latent
        outside the region becomes that latent noised to the level the step reached, with each request's own
        generator, so a batch does not change a request's result; after the last step it is the clean latent."""
        model, dev = self.model, self.device
        jpgs = torch.stack([torch.from_numpy(job.regions[i].jpg) for job, i in chunk]).permute(0, 3, 1, 2)
        z_bg = model.encode_image(jpgs.contiguous())  # (N, 4, 64, 64)
        inside = torch.stack([torch.from_numpy(job.regions[i].mask_i8 == 1) for job, i in chunk])[:, None].float()
        factor = inside.shape[-1] // z_bg.shape[-1]
        region = torch.nn.functional.max_pool2d(inside, factor)  # a latent cell touching the region is in it
        region = torch.nn.functional.max_pool2d(region, 2 * KEEP_DILATION + 1, stride=1, padding=KEEP_DILATION)
        outside = (1.0 - region).to(dev)
        generators = [torch.Generator().manual_seed(_row_seed(job, i, KEEP_SEED)) for job, i in chunk]
        # The step from which each row's background is re-imposed (every row has its own blend_start).
        starts = [first_step if from_start else max(first_step, math.floor(job.params.blend_start * steps))
                  for job, _ in chunk]
        z_bg = z_bg.to(dev)

        def after_step(x: torch.Tensor, step: int, level: float) -> torch.Tensor:
            # Every kept row draws its noise every step, so its draws do not depend on the rows beside it.
            noise = torch.stack([torch.randn(z_bg.shape[1:], generator=g) if k else torch.zeros(z_bg.shape[1:])
                                 for g, k in zip(generators, keep, strict=True)]).to(dev)
            active = [k and step >= s for k, s in zip(keep, starts, strict=True)]
            if not any(active):
                return x
            replace = (outside * torch.tensor(active, dtype=torch.float32, device=dev).view(-1, 1, 1, 1)) > 0
            known = z_bg if step == steps - 1 else level**0.5 * z_bg + (1 - level) ** 0.5 * noise
            return torch.where(replace, known, x)

        return after_step


KEEP_DILATION = 1  # latent cells (8 px each) added around the region before the background is re-imposed
KEEP_SEED = 0x6B656570  # offsets of the per-request generators of keep_background and harmonize, from the seed
HARMONIZE_SEED = 0x6861726D


def _row_seed(job: Job, region: int, offset: int) -> int:
    return (job.seed + offset + 7919 * region) % (2**63)


def _generator_noise(job: Job, region: int, offset: int, shape: torch.Size) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(_row_seed(job, region, offset)))


def _xywh(box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """A :func:`bbox_from_mask` box ``(y1, y2, x1, x2)``, inclusive ends, as ``(x, y, w, h)``."""
    y1, y2, x1, x2 = box
    return x1, y1, x2 - x1 + 1, y2 - y1 + 1
