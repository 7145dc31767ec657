"""Build a pipeline from what a deployment names: the demo model, or weights from a file or a URL.

Used by the service and by the Cog predictor alike, so both load weights the same way (URL download into the
cache with a checksum, strict loading, optional ``torch.compile``).
"""

from __future__ import annotations

from pathlib import Path

from model.nn.mask_refine import MaskRefiner
from model.pipeline.run import AnyDoorPipeline
from model.weights.download import is_url, resolve_weights


def load_pipeline(
    weights: str | None,
    *,
    demo: bool = False,
    config: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    sha256: str | None = None,
    cache_dir: str | None = None,
    compile: bool = False,
    mask_refine_weights: str | None = None,
) -> AnyDoorPipeline:
    """The demo model (``demo``), or ``weights``: a ``.safetensors``/``.ckpt`` path or an http(s) URL; with
    ``mask_refine_weights`` (a ``.pth``/``.safetensors`` path or URL, through the same cache) the refiner too."""
    dev = None if device == "auto" else device
    if demo:
        pipe = AnyDoorPipeline.demo(device=dev)
    else:
        if not weights:
            raise ValueError("no weights given (and not demo mode)")
        local: str | Path = weights
        if is_url(weights) or sha256:
            local = resolve_weights(weights, sha256=sha256,
                                    cache_dir=Path(cache_dir).expanduser() if cache_dir else None)
        pipe = AnyDoorPipeline.from_pretrained(Path(local).expanduser(), config=config, device=dev,
                                               dtype=None if dtype == "auto" else dtype)
    if mask_refine_weights:
        local_refiner: str | Path = mask_refine_weights
        if is_url(mask_refine_weights):
            local_refiner = resolve_weights(mask_refine_weights,
                                            cache_dir=Path(cache_dir).expanduser() if cache_dir else None)
        pipe.mask_refiner = MaskRefiner.from_checkpoint(Path(local_refiner).expanduser(), device=pipe.device)
    return pipe.compile_networks() if compile else pipe
