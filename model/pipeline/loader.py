"""The one loader: build a pipeline from what a surface names (:class:`LoadSpec`), the demo model or weights from
a file or a URL, with the optional mask refiner.

Used by the service, the Cog predictor, ``anydoor generate`` and ``anydoor batch`` alike, so every surface loads
weights the same way (URL download into the cache with a checksum, strict loading, optional ``torch.compile``,
the refiner's weights by path or URL through the same cache).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.weights.download import is_url, resolve_weights

REFINER_ENV = "ANYDOOR_MASK_REFINE_WEIGHTS"


@dataclass(frozen=True)
class LoadSpec:
    """What to load. ``refiner_setting`` is how the surface names the refiner's weights (``--mask-refine-weights``
    on the command line, ``ANYDOOR_MASK_REFINE_WEIGHTS`` for the service): a ``refiner_unavailable`` error names
    it, so the message says how to fix it where it was raised."""

    weights: str | None = None
    demo: bool = False
    config: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    sha256: str | None = None
    cache_dir: str | None = None
    compile: bool = False
    mask_refine_weights: str | None = None
    refiner_setting: str = REFINER_ENV


def load_pipeline(spec: LoadSpec) -> Any:
    """The demo model (``demo``), or ``weights``: a ``.safetensors``/``.ckpt`` path or an http(s) URL; with
    ``mask_refine_weights`` (a ``.pth``/``.safetensors`` path or URL, through the same cache) the refiner too."""
    from model.nn.mask_refine import MaskRefiner
    from model.pipeline.run import AnyDoorPipeline  # torch and the networks load only when a pipeline is built

    dev = None if spec.device == "auto" else spec.device
    cache = Path(spec.cache_dir).expanduser() if spec.cache_dir else None
    if spec.demo:
        pipe = AnyDoorPipeline.demo(device=dev)
    else:
        if not spec.weights:
            raise ValueError("no weights given (and not demo mode)")
        local: str | Path = spec.weights
        if is_url(spec.weights) or spec.sha256:
            local = resolve_weights(spec.weights, sha256=spec.sha256, cache_dir=cache)
        pipe = AnyDoorPipeline.from_pretrained(Path(local).expanduser(), config=spec.config, device=dev,
                                               dtype=None if spec.dtype == "auto" else spec.dtype)
    if spec.mask_refine_weights:
        local_refiner: str | Path = spec.mask_refine_weights
        if is_url(spec.mask_refine_weights):
            local_refiner = resolve_weights(spec.mask_refine_weights, cache_dir=cache)
        pipe.mask_refiner = MaskRefiner.from_checkpoint(Path(local_refiner).expanduser(), device=pipe.device)
    pipe.refiner_hint = f"set {spec.refiner_setting}"
    return pipe.compile_networks() if spec.compile else pipe


# --- the command line's loading flags, shared by `anydoor generate` and `anydoor batch` --------------------------


def add_load_arguments(p: Any, *, required: bool = True, device_help: str = "") -> Any:
    """``--weights W | --demo`` (a mutually exclusive group, returned so a command can add its own source) and
    ``--config --weights-sha256 --cache-dir --device --dtype --compile --mask-refine-weights``."""
    from model.config import DTYPE_NAMES

    src = p.add_mutually_exclusive_group(required=required)
    src.add_argument("--weights", metavar="PATH|URL",
                     help="weights: a .safetensors or the released .ckpt file, or an http(s) URL (cached)")
    src.add_argument("--demo", action="store_true", help="use a tiny random DEMO model (output is noise)")
    p.add_argument("--config", help="model config: upstream YAML or preset name (default: the released model)")
    p.add_argument("--weights-sha256", metavar="HEX", help="expected SHA-256 of the weights (checked after download)")
    p.add_argument("--cache-dir", metavar="DIR", help="download cache for URL weights (default: ~/.cache/anydoor)")
    p.add_argument("--device", default="auto", help=device_help or "cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="auto", choices=("auto", *DTYPE_NAMES),
                   help="compute dtype (auto: fp16 on CUDA, fp32 on the CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks (slow start, faster steps)")
    p.add_argument("--mask-refine-weights", metavar="PATH|URL", default=None,
                   help="weights of upstream demo's reference-mask refiner, for --refine-reference-mask "
                   f"[env {REFINER_ENV}]")
    return src


def load_spec_of(args: Any, environ: Any = None) -> LoadSpec:
    """The :class:`LoadSpec` of a command's loading flags (the refiner's weights default to the environment)."""
    env = os.environ if environ is None else environ
    refiner = args.mask_refine_weights or env.get(REFINER_ENV, "").strip() or None
    return LoadSpec(weights=args.weights, demo=bool(args.demo), config=args.config, device=args.device,
                    dtype=args.dtype, sha256=args.weights_sha256, cache_dir=args.cache_dir,
                    compile=bool(args.compile), mask_refine_weights=refiner,
                    refiner_setting=f"--mask-refine-weights or {REFINER_ENV}")
