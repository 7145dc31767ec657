"""Cog predictor for AnyDoor: the same pipeline as the HTTP service's ``POST /predict``, with the same inputs.

Its inputs are generated from the request spec (:mod:`model.spec`): each ``Input`` below is built by
:func:`_input` from the spec's field of the same name (Cog reads the names and types from this literal signature;
a test checks that they are exactly the spec's). Configured exactly like the service, by
:class:`service.settings.Settings` read from the environment:
``ANYDOOR_WEIGHTS`` (a path or an http(s) URL, downloaded once into ``ANYDOOR_CACHE_DIR`` and checked against
``ANYDOOR_WEIGHTS_SHA256``), ``ANYDOOR_CONFIG``, ``ANYDOOR_DEVICE``, ``ANYDOOR_DTYPE``, ``ANYDOOR_MAX_PIXELS``,
``ANYDOOR_WARMUP_STEPS``, ``ANYDOOR_DEMO``; the weights are loaded by the same loader as the service's
(:mod:`model.pipeline.loader`); nothing here imports the web stack. Where neither ``ANYDOOR_WEIGHTS`` nor
``ANYDOOR_DEMO`` is set, the weights Cog hands to ``setup`` (Replicate's ``COG_WEIGHTS``) are used.

Unlike upstream's predictor, the seed is honoured: the same inputs, parameters and seed give the same PNG.
"""

# No `from __future__ import annotations`: Cog reads the input types from the live annotations.

import os
import tempfile
import time
from typing import Any

from cog import BaseRunner, Input, Path

from model.pipeline.loader import load_pipeline
from model.pipeline.result import OUTPUT_STAGE, timings_text
from model.pipeline.run import AnyDoorPipeline
from model.pipeline.warmup import warmup_request
from model.spec.codecs import Wire, decode_request
from model.spec.files import LocalFiles
from model.spec.inputs import INPUT_FIELDS
from model.spec.params import OUTPUT_FORMATS, param_specs
from service.settings import Settings

_SPECS = {spec.name: spec for spec in param_specs()}
_FIELDS = {f.name: f for f in INPUT_FIELDS}


def _input(name: str) -> Any:
    """The Cog ``Input`` of one spec field: its default, bounds, choices and description."""
    if name in _FIELDS:
        field = _FIELDS[name]
        if field.required:
            return Input(description=field.help)
        return Input(default=None, description=field.help)
    spec = _SPECS[name]
    kwargs: dict[str, Any] = {"default": spec.default, "description": spec.help}
    cast = int if spec.kind == "int" else float
    if spec.ge is not None:
        kwargs["ge"] = cast(spec.ge)
    if spec.le is not None:
        kwargs["le"] = cast(spec.le)
    if spec.choices:
        kwargs["choices"] = list(spec.choices)
    return Input(**kwargs)


class Predictor(BaseRunner):
    def setup(self, weights: Any = None) -> None:
        """Load the weights once and run a warm-up generation, as the service does before it reports ready."""
        configured = any(os.environ.get(name, "").strip() for name in ("ANYDOOR_WEIGHTS", "ANYDOOR_DEMO"))
        settings = Settings.from_env(weights=None if configured or not weights else str(weights))
        self.settings = settings
        self.pipe: AnyDoorPipeline = load_pipeline(settings.load_spec())
        self.out_dir = Path(tempfile.mkdtemp(prefix="anydoor-cog-"))
        inputs, params = warmup_request(settings.warmup_steps)
        self.pipe.generate(inputs, params)
        print(f"AnyDoor ready: {self.pipe.weights_name} on {self.pipe.device} ({self.pipe.dtype})", flush=True)

    def run(
        self,
        reference: list[Path] = _input("reference"),
        background: Path = _input("background"),
        reference_mask: list[Path] | None = _input("reference_mask"),
        background_mask: Path | None = _input("background_mask"),
        box: str | None = _input("box"),
        placement: str | None = _input("placement"),
        placement_area: Path | None = _input("placement_area"),
        steps: int = _input("steps"),
        sampler: str = _input("sampler"),
        guidance_scale: float = _input("guidance_scale"),
        control_strength: float = _input("control_strength"),
        shape_control: bool = _input("shape_control"),
        seed: int | None = _input("seed"),
        reference_expand_ratio: float = _input("reference_expand_ratio"),
        target_box_expand_ratio: float = _input("target_box_expand_ratio"),
        crop_expand_ratio: float = _input("crop_expand_ratio"),
        refine_reference_mask: bool = _input("refine_reference_mask"),
        keep_background: bool = _input("keep_background"),
        blend_start: float = _input("blend_start"),
        feather: int = _input("feather"),
        harmonize: float = _input("harmonize"),
        num_outputs: int = _input("num_outputs"),
        output_format: str = _input("output_format"),
        output_quality: int = _input("output_quality"),
    ) -> list[Path]:
        """Insert the object of ``reference`` into each target region of ``background``; returns the images in
        ``output_format`` (a PNG by default): ``num_outputs`` candidates, best first (one for a single output)."""
        values = dict(locals())
        limits = self.settings.limits
        # The spec's codecs decode Cog's arguments as every surface's: lists are repeated fields, text targets
        # (boxes, a placement) are parsed, a blank optional text is not given; files are opened by the same rule
        # as the CLI's (regular files within the upload limit), after the counts are checked.
        items = [(name, item) for name in (*_FIELDS, *_SPECS)
                 for item in (values[name] if isinstance(values[name], list) else [values[name]])
                 if not (isinstance(item, str) and name in _FIELDS and not item.strip())]
        inputs, params = decode_request(items, Wire.COG, limits=limits, open_file=LocalFiles(limits=limits))
        total = params.steps

        def progress(step: int, steps: int, t: int) -> None:
            if step == steps or step % max(1, total // 10) == 0:
                print(f"step {step}/{steps}", flush=True)

        result = self.pipe.generate(inputs, params, progress=progress, limits=limits)
        ranked = result.candidates or (result,)
        self.record_metric("seed", result.seed)
        self.record_metric("seeds", [r.seed for r in ranked])
        self.record_metric("regions", result.regions)
        if result.scores is not None:
            self.record_metric("scores", [r.scores.to_dict() if r.scores is not None else None for r in ranked])
        suffix = OUTPUT_FORMATS[params.output_format][1]
        paths = []
        t_output = time.perf_counter()
        for candidate in ranked:
            fd, name = tempfile.mkstemp(suffix=suffix, prefix="anydoor-", dir=self.out_dir)
            with os.fdopen(fd, "wb") as f:
                f.write(candidate.encode(params.output_format, params.output_quality))
            paths.append(Path(name))
        timings = dict(result.timings)
        timings[OUTPUT_STAGE] = time.perf_counter() - t_output
        timings["total"] += timings[OUTPUT_STAGE]
        for stage, seconds in timings.items():
            self.record_metric(f"timing.{stage}", round(seconds, 4))
        print(f"seed={result.seed} regions={result.regions} {timings_text(timings)}", flush=True)
        return paths
