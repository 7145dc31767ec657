"""AnyDoorModel: the five networks of the released checkpoint under their upstream key prefixes.

``model.diffusion_model`` (UNet), ``control_model`` (ControlNet), ``first_stage_model`` (KL-VAE),
``cond_stage_model`` (DINOv2 + projector) and the DDPM schedule buffers: ``state_dict()`` has exactly the keys
and shapes of upstream's ``ControlLDM``, so checkpoints load strictly, key for key.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.config import AnyDoorConfig, UNetConfig, load_config, released_config
from model.diffusion.schedule import make_schedule
from model.errors import CheckpointError
from model.nn.controlnet import ControlNet
from model.nn.dinov2 import DinoV2Encoder
from model.nn.unet import UNetModel
from model.nn.vae import AutoencoderKL
from model.weights.checkpoint import SCHEDULE_KEYS, WeightsFile, check_keys

ControlScale = float | torch.Tensor


class _DiffusionWrapper(nn.Module):
    """Holds the UNet under ``model.diffusion_model`` as upstream's ``DiffusionWrapper`` does."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.diffusion_model = UNetModel(cfg)


class DeviceError(ValueError):
    """An unusable ``device`` or ``dtype``: names the setting, the value and what this machine offers instead.

    A ValueError, so callers that report bad arguments keep working; ``setting`` and ``reason`` let a command line
    name its own flag (``--device cuda: CUDA is not available on this machine (available: cpu)``).
    """

    def __init__(self, setting: str, value: object, reason: str) -> None:
        super().__init__(f"{setting} {value}: {reason}")
        self.setting = setting
        self.value = str(value)
        self.reason = reason


def available_devices() -> list[str]:
    """The device names that work on this machine: ``cpu``, then ``cuda``, ``cuda:0`` ... and ``mps`` if present."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    if torch.backends.mps.is_available():
        names.append("mps")
    return names


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` (CUDA when available, else the CPU) or a device that exists here; else :class:`DeviceError`.

    Checked here, before any weights move, so a wrong device is one clear message instead of a CUDA traceback
    from deep inside loading."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    available = f"(available: {', '.join(available_devices())})"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise DeviceError("device", device, f"expected auto, cpu, cuda or cuda:N {available}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("device", device, f"CUDA is not available on this machine {available}")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise DeviceError("device", device, f"this machine has {count} CUDA device{'s' if count != 1 else ''} "
                              f"{available}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError("device", device, f"MPS is not available on this machine {available}")
    elif dev.type != "cpu":
        raise DeviceError("device", device, f"expected auto, cpu, cuda or cuda:N {available}")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The compute dtype of UNet, ControlNet and DINOv2: fp16 autocast on CUDA, float32 on the CPU by default."""
    names = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp32": torch.float32, "float32": torch.float32}
    if dtype is None or dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in names:
            raise DeviceError("dtype", dtype, "dtype must be one of auto, fp16, bf16, fp32")
        dtype = names[dtype]
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise DeviceError("dtype", dtype, "dtype must be one of auto, fp16, bf16, fp32")
    if device.type == "cpu" and dtype == torch.float16:
        raise DeviceError("dtype", dtype_name(dtype), "float16 is not supported on the CPU (available on cpu: fp32, "
                          "bf16)")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """The name of a compute dtype as settings, flags and health reports spell it (``fp16``, ``bf16``, ``fp32``)."""
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dtype, str(dtype))


class AnyDoorModel(nn.Module):
    alphas_cumprod: torch.Tensor  # (T,) registered with the other DDPM buffers in __init__

    def __init__(self, config: AnyDoorConfig | None = None) -> None:
        super().__init__()
        self.config = config or released_config()
        self.model = _DiffusionWrapper(self.config.unet)
        self.control_model = ControlNet(self.config.controlnet)
        self.first_stage_model = AutoencoderKL(self.config.vae)
        self.cond_stage_model = DinoV2Encoder(self.config.dino)
        for name, value in make_schedule(self.config.schedule).items():
            self.register_buffer(name, value)
        self.compute_dtype = torch.float32
        self._uncond: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    # --- construction -------------------------------------------------------------------------------------

    @classmethod
    def expected_shapes(cls, config: AnyDoorConfig) -> dict[str, tuple[int, ...]]:
        """Key -> shape of the checkpoint for ``config``, computed on the meta device (no memory)."""
        with torch.device("meta"):
            model = cls(config)
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        config: AnyDoorConfig | str | Path | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> AnyDoorModel:
        """Load ``.safetensors`` or a Lightning ``.ckpt`` strictly.

        The model is built on the meta device and each tensor is moved into place (``assign``) as it is read,
        so host memory holds one copy of the weights. A missing, unexpected or mis-shaped key raises
        :class:`CheckpointError` naming it. UNet, ControlNet and DINOv2 weights take ``dtype`` (the compute
        dtype); the VAE stays float32 so its decode cannot overflow.
        """
        if config is None:
            config = released_config()
        elif not isinstance(config, AnyDoorConfig):
            config = load_config(config)
        dev = resolve_device(device)
        compute = resolve_dtype(dtype, dev)
        wf = WeightsFile(path)
        with torch.device("meta"):
            model = cls(config)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        check_keys(expected, {k: wf.shape(k) for k in wf.keys()}, str(path))

        state: dict[str, torch.Tensor] = {}
        for key in expected:
            t = wf.tensor(key)
            keep_fp32 = key in SCHEDULE_KEYS or key.startswith("first_stage_model.") or not t.is_floating_point()
            state[key] = t.to(device=dev, dtype=torch.float32 if keep_fp32 else compute)
        model.load_state_dict(state, strict=True, assign=True)
        del state
        model._materialize_nonpersistent(dev)
        model.compute_dtype = compute
        model._check_schedule()
        return model.eval().requires_grad_(False)

    def _materialize_nonpersistent(self, device: torch.device) -> None:
        """Buffers outside the state dict (normalisation constants) are still on meta after an ``assign`` load."""
        for module in self.modules():
            reset = getattr(module, "reset_nonpersistent_buffers", None)
            if module is not self and callable(reset):
                reset(device)
        leftover = [n for n, b in self.named_buffers() if b.is_meta]
        assert not leftover, f"buffers left on the meta device: {leftover}"

    def _check_schedule(self) -> None:
        ref = make_schedule(self.config.schedule)["alphas_cumprod"]
        if not torch.allclose(self.alphas_cumprod.cpu(), ref, rtol=1e-5, atol=1e-7):
            raise CheckpointError(
                "the checkpoint's alphas_cumprod does not match the configured schedule "
                f"(linear_start={self.config.schedule.linear_start}, linear_end={self.config.schedule.linear_end})"
            )

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        self._uncond.clear()
        return super().load_state_dict(*args, **kwargs)

    def _apply(self, fn: Any, recurse: bool = True) -> AnyDoorModel:
        self._uncond.clear()
        return super()._apply(fn, recurse)

    # --- precision ----------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """fp16/bf16 autocast for the diffusion networks where the compute dtype asks for it."""
        if self.compute_dtype == torch.float32:
            yield
            return
        with torch.autocast(device_type=self.device.type, dtype=self.compute_dtype):
            yield

    # --- the model's operations ----------------------------------------------------------------------------

    @torch.no_grad()
    def encode_reference(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, 224, 224) in [0, 1] -> ID tokens (B, 257, context_dim), float32."""
        with self.autocast():
            return self.cond_stage_model(images.to(self.device)).float()

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, 224, 224) in [0, 1] -> (B, C) float32: DINOv2's class-token features, the identity
        embedding of :mod:`model.pipeline.scores` (the backbone's output, before the projection to context)."""
        with self.autocast():
            return self.cond_stage_model.features(images.to(self.device))[:, 0].float()

    @torch.no_grad()
    def uncond_tokens(self, batch: int = 1) -> torch.Tensor:
        """Tokens of an all-zero image, the unconditional branch of guidance; computed once per loaded model."""
        key = (self.device, self.compute_dtype)
        if key not in self._uncond:
            size = self.config.dino.input_size
            self._uncond[key] = self.encode_reference(torch.zeros(1, 3, size, size, device=self.device))
        return self._uncond[key].expand(batch, -1, -1)

    @torch.no_grad()
    def encode_hint(self, hint: torch.Tensor) -> torch.Tensor:
        """hint (B, 4, 512, 512) in [-1, 1] (collage + mask channel) -> the ControlNet's hint features."""
        with self.autocast():
            return self.control_model.encode_hint(hint.to(self.device))

    @torch.no_grad()
    def predict_noise(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor | int,
        context: torch.Tensor,
        hint: torch.Tensor | None = None,
        control_scale: ControlScale = 1.0,
        *,
        guided_hint: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x_t (B, 4, 64, 64), t (B,) or int, context (B, 257, D), hint (B, 4, 512, 512) -> eps (B, 4, 64, 64).

        ``control_scale`` scales all 13 ControlNet residuals: a float, or a (B,) tensor (one per batch item).
        """
        b = x_t.shape[0]
        if not isinstance(t, torch.Tensor):
            t = torch.full((b,), int(t), device=x_t.device, dtype=torch.long)
        elif t.ndim == 0:
            t = t.expand(b)
        unet = self.model.diffusion_model
        with self.autocast():
            control = None
            if not (isinstance(control_scale, float | int) and control_scale == 0):
                if guided_hint is None:
                    if hint is None:
                        raise ValueError("predict_noise needs a hint (or guided_hint) unless control_scale is 0")
                    guided_hint = self.control_model.encode_hint(hint)
                residuals = self.control_model(t, context, guided_hint=guided_hint)
                # The residuals are fresh zero-conv outputs: scale them in place.
                if isinstance(control_scale, torch.Tensor) and control_scale.ndim > 0:
                    scale = control_scale.to(x_t.device).view(-1, 1, 1, 1)
                    control = [r.mul_(scale.to(r.dtype)) for r in residuals]
                elif float(control_scale) == 1.0:
                    control = residuals  # x * 1.0 == x
                else:
                    control = [r.mul_(float(control_scale)) for r in residuals]
            eps = unet(x_t, t, context, control)
        return eps.float()

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> scaled latent (B, 4, H/8, W/8): posterior mean x scale_factor."""
        with torch.autocast(device_type=self.device.type, enabled=False):
            mean, _ = self.first_stage_model.encode(images.to(self.device, torch.float32))
        return mean * self.config.schedule.scale_factor

    @torch.no_grad()
    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latent (B, 4, h, w) -> images (B, 3, 8h, 8w) in [-1, 1] scale (unclipped), float32.

        Runs in float32 outside autocast: an fp16 VAE decoder overflows to inf/NaN on real latents."""
        with torch.autocast(device_type=self.device.type, enabled=False):
            z = z.to(self.device, torch.float32) * (1.0 / self.config.schedule.scale_factor)  # as upstream: 1/s * z
            return self.first_stage_model.decode(z)
