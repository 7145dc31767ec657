"""The demo's "Reference Mask Refine" network: a coarse object mask in, a refined one out.

Upstream AnyDoor's Gradio demo (``run_gradio_demo.py``) can clean up the reference mask a user scribbled before
anything else runs, with a small interactive-segmentation network (``iseg/coarse_mask_refine_util.py``, class
``BaselineModel``, weights ``iseg/coarse_mask_refine.pth``). This is an independent implementation of that network
that keeps upstream's parameter names, so its checkpoint loads key for key:

* ``maps_transform``: the side branch. The three-channel map ``[previous mask = 0, coarse mask, 0]`` goes through a
  3x3 stride-2 convolution, LeakyReLU(0.2), a 3x3 convolution and a learned scalar gain applied as ``abs(scale)``;
  the result is added to the backbone's features right after its first convolution.
* ``feature_extractor.backbone``: MobileNetV2 with output stride 8. Its last two stages do not downsample; instead
  the *first* block of each of their channel groups uses a dilated depthwise convolution (2, resp. 4) and the
  blocks after it are undilated, exactly as upstream builds them.
* ``feature_extractor.lraspp``: a Lite R-ASPP head on the stride-8 features, fused with the stride-4 features of
  the second stage, then a 1x1 convolution to one logit per pixel (``head``). ``aux_head`` exists for the weights
  only; the demo never uses its output.

The image goes in as RGB in ``[0, 1]`` without any mean/std normalisation and without padding: every convolution
pads itself, so any size works (odd sizes round up at each stride-2 step). All resampling is bilinear with
``align_corners=True``, and the logit map is brought back to the input size before the sigmoid.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from model.errors import CheckpointError

__all__ = [
    "MaskRefineNet",
    "MaskRefiner",
    "convert_mask_refiner",
    "load_mask_refiner_state_dict",
    "mask_refiner_state_dict_keys",
]

THRESHOLD = 0.5
# BatchNorm's counter is not used in eval mode; PyTorch's strict loading tolerates its absence, and so do we.
_OPTIONAL_SUFFIX = ".num_batches_tracked"
_LISTED_KEYS = 12  # how many offending keys an error message names before it summarises the rest


# ============================================================================ building blocks


class ConvBNAct(nn.Module):
    """Bias-free convolution, BatchNorm, then ReLU6 or ReLU. Parameters: ``conv.weight``, ``bn.*``."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        relu6: bool = True,
    ) -> None:
        super().__init__()
        padding = dilation * (kernel // 2)  # "same" padding for odd kernels, at any dilation
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, stride, padding, dilation, groups, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)
        self.act: nn.Module = nn.ReLU6(inplace=True) if relu6 else nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expansion (skipped when ``expand == 1``), 3x3 depthwise, linear 1x1 projection.

    Parameter layout under ``conv``: with expansion ``0`` (pw ConvBNAct), ``1`` (dw ConvBNAct), ``2`` (projection
    conv), ``3`` (its BatchNorm); without, ``0`` (dw), ``1`` (projection), ``2`` (BatchNorm). The input is added
    back when the block keeps both resolution and width.
    """

    def __init__(self, in_ch: int, out_ch: int, *, stride: int, expand: int, dilation: int = 1) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        hidden = int(round(in_ch * expand))
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(ConvBNAct(in_ch, hidden, 1))
        layers += [
            ConvBNAct(hidden, hidden, 3, stride=stride, dilation=dilation, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return x + y if self.residual else y


# One backbone stage: its channel groups as (expansion t, out channels c, repeats n, stride s), and the dilation
# that replaces the stride of each group's first block (1: no dilation, the stride is kept).
_Stage = tuple[tuple[tuple[int, int, int, int], ...], int]
_STAGES: dict[str, _Stage] = {
    "block1": (((1, 16, 1, 1),), 1),  # stays at stride 2, 16 ch
    "block2": (((6, 24, 2, 2),), 1),  # -> stride 4, 24 ch  (the fusion's fine features)
    "block3": (((6, 32, 3, 2),), 1),  # -> stride 8, 32 ch
    "block4": (((6, 64, 4, 2), (6, 96, 3, 1)), 2),  # stays at stride 8, 96 ch
    "block5": (((6, 160, 3, 2), (6, 320, 1, 1)), 4),  # stays at stride 8, 320 ch
}


def _make_stage(in_ch: int, stage: _Stage) -> tuple[nn.Sequential, int]:
    groups, dilation = stage
    blocks: list[nn.Module] = []
    for expand, out_ch, repeats, stride in groups:
        # Upstream's quirk, kept for its numbers: only the first block of a dilated group is dilated.
        first_stride = stride if dilation == 1 else 1
        blocks.append(InvertedResidual(in_ch, out_ch, stride=first_stride, expand=expand, dilation=dilation))
        blocks += [InvertedResidual(out_ch, out_ch, stride=1, expand=expand) for _ in range(repeats - 1)]
        in_ch = out_ch
    return nn.Sequential(*blocks), in_ch


class MobileNetV2OS8(nn.Module):
    """MobileNetV2 trunk at output stride 8; returns the stride-4 (24 ch) and stride-8 (320 ch) features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = ConvBNAct(3, 32, 3, stride=2)
        ch = 32
        self.block1, ch = _make_stage(ch, _STAGES["block1"])
        self.block2, ch = _make_stage(ch, _STAGES["block2"])
        self.block3, ch = _make_stage(ch, _STAGES["block3"])
        self.block4, ch = _make_stage(ch, _STAGES["block4"])
        self.block5, ch = _make_stage(ch, _STAGES["block5"])
        self.out_channels = ch

    def forward(self, image: torch.Tensor, side: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.conv1(image) + side  # (B,32,H/2,W/2); H/2 etc. round up
        x = self.block1(x)  # (B,16,H/2,W/2)
        fine = self.block2(x)  # (B,24,H/4,W/4)
        x = self.block3(fine)  # (B,32,H/8,W/8)
        x = self.block4(x)  # (B,96,H/8,W/8)
        coarse = self.block5(x)  # (B,320,H/8,W/8)
        return fine, coarse


class LiteRASPP(nn.Module):
    """Lite R-ASPP: 1x1 conv-BN-ReLU features gated by a sigmoid of 1x1-convolved 2x2 average-pooled features."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.b0 = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))
        self.b1 = nn.Sequential(nn.AdaptiveAvgPool2d((2, 2)), nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.b0(x)  # (B,out,h,w)
        gate = F.interpolate(self.b1(x), size=x.shape[-2:], mode="bilinear", align_corners=True)  # (B,out,2,2)->h,w
        return feat * gate


class MobileSeg(nn.Module):
    """Backbone + Lite R-ASPP + stride-4 fusion -> one logit per stride-4 pixel."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = MobileNetV2OS8()
        self.lraspp = LiteRASPP(self.backbone.out_channels, 128)
        self.fusion_conv1 = nn.Conv2d(128, 16, 1)
        self.fusion_conv2 = nn.Conv2d(24, 16, 1)
        self.head = nn.Conv2d(16, 1, 1)
        self.aux_head = nn.Conv2d(16, 1, 1)  # trained as an auxiliary loss; its output is never used

    def forward(self, image: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        fine, coarse = self.backbone(image, side)  # (B,24,H/4,W/4), (B,320,H/8,W/8)
        coarse = self.lraspp(coarse)  # (B,128,H/8,W/8)
        coarse = F.interpolate(coarse, size=fine.shape[-2:], mode="bilinear", align_corners=True)
        fused = self.fusion_conv1(coarse) + self.fusion_conv2(fine)  # (B,16,H/4,W/4)
        return self.head(fused)  # (B,1,H/4,W/4)


class AbsScale(nn.Module):
    """Multiplies by ``abs(scale)``, a learned scalar (upstream's ``ScaleLayer`` with ``lr_mult = 1``)."""

    def __init__(self, init: float = 0.05) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((1,), init, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.abs()


class MaskRefineNet(nn.Module):
    """Upstream's ``BaselineModel``: ``(image, coarse mask) -> refined-mask logits`` at the input size.

    ``image`` (B,3,H,W) RGB float in ``[0, 1]`` (no normalisation), ``mask`` (B,1,H,W) float in ``{0, 1}``.
    Returns logits (B,1,H,W); ``sigmoid(logits) > 0.5`` is the refined mask.
    """

    def __init__(self) -> None:
        super().__init__()
        self.feature_extractor = MobileSeg()
        self.maps_transform = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1),
            nn.LeakyReLU(negative_slope=0.2),
            nn.Conv2d(16, 32, 3, stride=1, padding=1),
            AbsScale(0.05),
        )

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        zeros = torch.zeros_like(mask)
        side = torch.cat((zeros, mask, zeros), dim=1)  # (B,3,H,W): previous mask (none), coarse mask, nothing
        side = self.maps_transform(side)  # (B,32,H/2,W/2), the same grid as the backbone's first convolution
        logits = self.feature_extractor(image, side)  # (B,1,H/4,W/4)
        return F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=True)  # (B,1,H,W)


# ============================================================================ weights


def mask_refiner_state_dict_keys() -> dict[str, tuple[int, ...]]:
    """Every key of upstream's checkpoint (``state_dict``) with its shape."""
    with torch.device("meta"):
        net = MaskRefineNet()
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def _name_keys(keys: Sequence[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_LISTED_KEYS])
    return shown if len(keys) <= _LISTED_KEYS else f"{shown}, ... ({len(keys) - _LISTED_KEYS} more)"


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error type, or OSError, for damaged files
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    try:
        # weights_only: PyTorch's restricted unpickler; it refuses any object that is not tensors and containers,
        # so a checkpoint cannot run code while it loads.
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for forbidden objects, RuntimeError/EOFError for damaged files
        raise CheckpointError(f"{path}: not a loadable weights-only torch checkpoint ({type(e).__name__}: {e})") from e
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict or {{'state_dict': ...}}, got {type(obj).__name__}")
    not_tensors = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{path}: entries that are not tensors: {_name_keys(not_tensors)}")
    return {str(k): v for k, v in obj.items()}


def load_mask_refiner_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read and check a mask-refiner checkpoint: upstream's ``.pth`` or our ``.safetensors``.

    Accepts ``{"state_dict": ...}`` or a bare state dict, with or without a ``module.`` prefix on every key.
    Raises :class:`CheckpointError` naming any missing, unexpected or mis-shaped keys, and for damaged files.
    Floating-point tensors are returned as float32.
    """
    path = Path(path)
    tensors = _read_tensors(path)
    if tensors and all(k.startswith("module.") for k in tensors):  # saved from a DataParallel wrapper
        tensors = {k.removeprefix("module."): v for k, v in tensors.items()}

    expected = mask_refiner_state_dict_keys()
    missing = [k for k in expected if k not in tensors and not k.endswith(_OPTIONAL_SUFFIX)]
    unexpected = [k for k in tensors if k not in expected]
    misshaped = [
        f"{k} {tuple(v.shape)} (expected {expected[k]})"
        for k, v in tensors.items()
        if k in expected and tuple(v.shape) != expected[k]
    ]
    wrong_dtype = [
        f"{k} ({v.dtype})"
        for k, v in tensors.items()
        if k in expected and not k.endswith(_OPTIONAL_SUFFIX) and not v.is_floating_point()
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_name_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_name_keys(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped keys: {_name_keys(misshaped)}")
    if wrong_dtype:
        problems.append(f"keys that are not floating point: {_name_keys(wrong_dtype)}")
    if problems:
        raise CheckpointError(f"{path}: not a mask-refiner checkpoint: " + "; ".join(problems))

    return {
        k: v.to(torch.long) if k.endswith(_OPTIONAL_SUFFIX) else v.to(torch.float32).contiguous()
        for k, v in tensors.items()
    }


def convert_mask_refiner(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Check ``src`` (upstream's ``coarse_mask_refine.pth`` or a ``.safetensors``) and write it as ``dst``.

    Same keys, float32 (BatchNorm counters int64), written to a temporary file then renamed into place.
    """
    dst = Path(dst)
    if dst.suffix != ".safetensors":
        raise ValueError(f"dst: must end in .safetensors, got {dst.name!r}")
    state = load_mask_refiner_state_dict(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata={"format": "pt"})
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dst


# ============================================================================ numpy in, numpy out


def _bad(argument: str, message: str) -> ValueError:
    # A plain ValueError whose message starts with the argument's name; the service maps it to its own error codes.
    return ValueError(f"{argument}: {message}")


def _check_inputs(image: Any, mask: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate the numpy inputs; returns the image (uint8, writable) and the mask as float32 {0, 1}."""
    if not isinstance(image, np.ndarray):
        raise _bad("image", f"expected a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise _bad("image", f"expected dtype uint8, got {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise _bad("image", f"expected shape (H, W, 3) RGB, got {image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise _bad("image", f"empty image {image.shape}")
    if not isinstance(mask, np.ndarray):
        raise _bad("mask", f"expected a numpy array, got {type(mask).__name__}")
    if mask.dtype != np.bool_ and not np.issubdtype(mask.dtype, np.integer):
        raise _bad("mask", f"expected a bool or integer array of 0/1, got dtype {mask.dtype}")
    if mask.ndim != 2:
        raise _bad("mask", f"expected shape (H, W), got {mask.shape}")
    if mask.shape != image.shape[:2]:
        raise _bad("mask", f"size {mask.shape} does not match the image's {image.shape[:2]}")
    if mask.dtype != np.bool_ and not np.isin(mask, (0, 1)).all():
        raise _bad("mask", "values must be 0 or 1")
    # torch.from_numpy wants writable, contiguous memory (decoded images are often read-only views)
    image = image if image.flags.writeable and image.flags.c_contiguous else image.copy()
    return image, mask.astype(np.float32)


class MaskRefiner:
    """Refines a coarse reference mask the way upstream's demo does.

    >>> refiner = MaskRefiner.from_checkpoint("weights/coarse_mask_refine.safetensors")
    >>> refined = refiner(image, coarse)  # (H, W, 3) uint8 RGB, (H, W) 0/1 -> (H, W) bool
    """

    def __init__(self, net: MaskRefineNet, device: str | torch.device | None = None) -> None:
        self.device = _pick_device(device)
        self.net = net.to(device=self.device, dtype=torch.float32).eval().requires_grad_(False)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike[str], device: str | torch.device | None = None) -> MaskRefiner:
        """Load upstream's ``coarse_mask_refine.pth`` or a converted ``.safetensors``, strictly.

        ``device`` None means CUDA where available, else the CPU.
        """
        state = load_mask_refiner_state_dict(path)
        with torch.device("meta"):
            net = MaskRefineNet()
        net.load_state_dict(state, strict=True, assign=True)
        return cls(net, device)

    @torch.no_grad()
    def probability(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB and an (H, W) 0/1 mask -> the (H, W) float32 probability of the refined mask."""
        image, mask = _check_inputs(image, mask)
        img = torch.from_numpy(image).to(self.device).permute(2, 0, 1)[None].float().div(255)  # (1,3,H,W) in [0,1]
        msk = torch.from_numpy(mask).to(self.device)[None, None]  # (1,1,H,W) float in {0,1}
        logits = self.net(img, msk)  # (1,1,H,W)
        return torch.sigmoid(logits)[0, 0].float().cpu().numpy()

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The refined (H, W) bool mask: ``probability > 0.5``."""
        return self.probability(image, mask) > THRESHOLD


def _pick_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
