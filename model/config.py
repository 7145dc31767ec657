"""Typed configuration of the AnyDoor model, with presets and a reader for the upstream YAML layout.

The upstream project describes the model with an OmegaConf YAML whose ``target:`` strings name classes to
import. Here the same information lives in frozen dataclasses; :func:`load_config` maps the upstream layout
(``model.params.{unet_config,control_stage_config,first_stage_config,cond_stage_config}``) into them and never
imports anything by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

# Compute/storage dtype names, everywhere (settings, flags, conversion); model.nn.anydoor maps them to torch.
DTYPE_NAMES = ("fp16", "bf16", "fp32")


def _check_positive(owner: str, **values: int | float) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{owner}.{name} must be positive, got {value!r}")


@dataclass(frozen=True)
class UNetConfig:
    """The SD-2.x UNet (``model.diffusion_model``); also the trunk of the ControlNet."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_res_blocks: int = 2
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_head_channels: int = 64
    transformer_depth: int = 1
    context_dim: int = 1024

    def __post_init__(self) -> None:
        name = type(self).__name__
        _check_positive(
            name,
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            model_channels=self.model_channels,
            num_res_blocks=self.num_res_blocks,
            num_head_channels=self.num_head_channels,
            transformer_depth=self.transformer_depth,
            context_dim=self.context_dim,
        )
        if not self.channel_mult or any(m <= 0 for m in self.channel_mult):
            raise ValueError(f"{name}.channel_mult must be non-empty and positive, got {self.channel_mult!r}")
        for mult in self.channel_mult:
            channels = mult * self.model_channels
            if channels % 32:
                raise ValueError(f"{name}: {channels} channels (model_channels * {mult}) is not divisible by 32 groups")
            if channels % self.num_head_channels:
                raise ValueError(
                    f"{name}: {channels} channels is not divisible by num_head_channels={self.num_head_channels}"
                )

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels


@dataclass(frozen=True)
class ControlNetConfig(UNetConfig):
    """The ControlNet (``control_model``): the UNet's encoder half plus a hint encoder for the collage."""

    hint_channels: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive(type(self).__name__, hint_channels=self.hint_channels)


@dataclass(frozen=True)
class VAEConfig:
    """The KL autoencoder (``first_stage_model``)."""

    embed_dim: int = 4
    z_channels: int = 4
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    resolution: int = 256
    double_z: bool = True

    def __post_init__(self) -> None:
        _check_positive(
            "VAEConfig",
            embed_dim=self.embed_dim,
            z_channels=self.z_channels,
            in_channels=self.in_channels,
            out_ch=self.out_ch,
            ch=self.ch,
            num_res_blocks=self.num_res_blocks,
            resolution=self.resolution,
        )
        if not self.ch_mult or any(m <= 0 for m in self.ch_mult):
            raise ValueError(f"VAEConfig.ch_mult must be non-empty and positive, got {self.ch_mult!r}")
        if not self.double_z:
            raise ValueError("VAEConfig.double_z=False is not supported: AnyDoor's VAE is a KL autoencoder")


@dataclass(frozen=True)
class DinoV2Config:
    """The frozen DINOv2 ViT (``cond_stage_model.model``) and its projector to the UNet's context width."""

    embed_dim: int = 1536
    depth: int = 40
    num_heads: int = 24
    mlp_ratio: float = 4.0
    patch_size: int = 14
    img_size: int = 518
    ffn_layer: str = "swiglufused"
    init_values: float = 1.0
    context_dim: int = 1024
    # AnyDoor feeds 224x224 crops (16x16 patches); the position embedding is interpolated from img_size.
    input_size: int = 224

    def __post_init__(self) -> None:
        _check_positive(
            "DinoV2Config",
            embed_dim=self.embed_dim,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            patch_size=self.patch_size,
            img_size=self.img_size,
            context_dim=self.context_dim,
            input_size=self.input_size,
        )
        if self.embed_dim % self.num_heads:
            raise ValueError(f"DinoV2Config.embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if self.ffn_layer not in ("swiglufused", "swiglu"):
            raise ValueError(f"DinoV2Config.ffn_layer must be 'swiglufused' or 'swiglu', got {self.ffn_layer!r}")
        for name in ("img_size", "input_size"):
            if getattr(self, name) % self.patch_size:
                raise ValueError(f"DinoV2Config.{name}={getattr(self, name)} is not a multiple of {self.patch_size}")

    @property
    def num_tokens(self) -> int:
        """Class token plus patch tokens for one ``input_size`` image (257 for 224 / 14)."""
        return 1 + (self.input_size // self.patch_size) ** 2


@dataclass(frozen=True)
class ScheduleConfig:
    """The DDPM noise schedule of SD 2.1 (eps prediction, scaled-linear betas) and the latent scale."""

    timesteps: int = 1000
    linear_start: float = 0.00085
    linear_end: float = 0.012
    scale_factor: float = 0.18215

    def __post_init__(self) -> None:
        _check_positive("ScheduleConfig", timesteps=self.timesteps, scale_factor=self.scale_factor)
        if not 0 < self.linear_start < self.linear_end < 1:
            raise ValueError(
                f"ScheduleConfig needs 0 < linear_start < linear_end < 1, got {self.linear_start}, {self.linear_end}"
            )


@dataclass(frozen=True)
class AnyDoorConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    controlnet: ControlNetConfig = field(default_factory=ControlNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    dino: DinoV2Config = field(default_factory=DinoV2Config)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    # The latent grid of the 512x512 crop; the hint has 8x its size.
    image_size: int = 64
    latent_channels: int = 4

    def __post_init__(self) -> None:
        contexts = {
            "unet.context_dim": self.unet.context_dim,
            "controlnet.context_dim": self.controlnet.context_dim,
            "dino.context_dim": self.dino.context_dim,
        }
        if len(set(contexts.values())) != 1:
            raise ValueError(f"context widths must agree: {contexts}")
        if self.unet.in_channels != self.latent_channels or self.vae.embed_dim != self.latent_channels:
            raise ValueError(
                f"latent channels must agree: unet.in_channels={self.unet.in_channels}, "
                f"vae.embed_dim={self.vae.embed_dim}, latent_channels={self.latent_channels}"
            )
        trunk = ("model_channels", "attention_resolutions", "num_res_blocks", "channel_mult", "num_head_channels")
        for name in trunk:
            if getattr(self.unet, name) != getattr(self.controlnet, name):
                raise ValueError(
                    f"controlnet.{name}={getattr(self.controlnet, name)!r} differs from unet.{name}="
                    f"{getattr(self.unet, name)!r}: the ControlNet's residuals must match the UNet's skips"
                )

    @property
    def hint_size(self) -> int:
        return 8 * self.image_size


def released_config() -> AnyDoorConfig:
    """The configuration of the released checkpoint (``epoch=1-step=8687.ckpt``)."""
    return AnyDoorConfig()


def tiny_config() -> AnyDoorConfig:
    """The small random model of the reference cases (``tests/fixtures/reference/case_*/model.yaml``)."""
    trunk: dict[str, Any] = dict(
        model_channels=32, channel_mult=(1, 1, 2, 2), num_head_channels=16, context_dim=32
    )
    return AnyDoorConfig(
        unet=UNetConfig(**trunk),
        controlnet=ControlNetConfig(**trunk),
        vae=VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1),
        dino=DinoV2Config(embed_dim=64, depth=2, num_heads=4, context_dim=32),
    )


PRESETS = {"released": released_config, "tiny": tiny_config}


# --- upstream YAML layout -------------------------------------------------------------------------------------

_UNET_KEYS = (
    "in_channels",
    "out_channels",
    "model_channels",
    "attention_resolutions",
    "num_res_blocks",
    "channel_mult",
    "num_head_channels",
    "transformer_depth",
    "context_dim",
)


def _trunk_kwargs(section: dict[str, Any], where: str, keys: tuple[str, ...]) -> dict[str, Any]:
    if not section.get("use_spatial_transformer", True):
        raise ValueError(f"{where}.use_spatial_transformer=false is not supported (AnyDoor uses SD-2.x blocks)")
    if not section.get("use_linear_in_transformer", True):
        raise ValueError(f"{where}.use_linear_in_transformer=false is not supported (SD-2.x uses linear projections)")
    if section.get("legacy", False):
        raise ValueError(f"{where}.legacy=true is not supported (SD-2.x configs set legacy: false)")
    if section.get("num_heads", -1) != -1 and "num_head_channels" not in section:
        raise ValueError(f"{where}: a fixed num_heads is not supported; set num_head_channels")
    out: dict[str, Any] = {}
    for key in keys:
        if key in section:
            value = section[key]
            out[key] = tuple(value) if isinstance(value, list) else value
    return out


def config_from_dict(raw: dict[str, Any]) -> AnyDoorConfig:
    """Map a parsed upstream config (``{"model": {"params": ...}}``) into :class:`AnyDoorConfig`."""
    try:
        params = raw["model"]["params"]
    except (KeyError, TypeError) as exc:
        raise ValueError("not an AnyDoor config: expected a top-level 'model.params' section") from exc
    for section in ("unet_config", "control_stage_config", "first_stage_config"):
        if section not in params or "params" not in params[section]:
            raise ValueError(f"AnyDoor config is missing 'model.params.{section}.params'")

    unet = UNetConfig(**_trunk_kwargs(params["unet_config"]["params"], "unet_config", _UNET_KEYS))
    control_section = params["control_stage_config"]["params"]
    controlnet = ControlNetConfig(
        **_trunk_kwargs(control_section, "control_stage_config", (*_UNET_KEYS[:1], *_UNET_KEYS[2:], "hint_channels"))
    )

    dd = params["first_stage_config"]["params"].get("ddconfig", {})
    vae_kwargs: dict[str, Any] = {"embed_dim": params["first_stage_config"]["params"].get("embed_dim", 4)}
    for key in ("z_channels", "in_channels", "out_ch", "ch", "ch_mult", "num_res_blocks", "attn_resolutions",
                "resolution", "double_z"):
        if key in dd:
            vae_kwargs[key] = tuple(dd[key]) if isinstance(dd[key], list) else dd[key]
    vae = VAEConfig(**vae_kwargs)

    # Upstream hard-codes ViT-g/14 with a 1536 -> 1024 projector; a `params` block (added by the reference
    # cases) describes a different ViT. No block means the released encoder.
    cond_params = (params.get("cond_stage_config") or {}).get("params") or {}
    dino_kwargs = {k: cond_params[k] for k in (
        "embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size", "img_size", "ffn_layer", "init_values",
        "context_dim") if k in cond_params}
    dino = DinoV2Config(**dino_kwargs)

    schedule = ScheduleConfig(
        timesteps=params.get("timesteps", 1000),
        linear_start=params.get("linear_start", 0.00085),
        linear_end=params.get("linear_end", 0.012),
        scale_factor=params.get("scale_factor", 0.18215),
    )
    return AnyDoorConfig(
        unet=unet,
        controlnet=controlnet,
        vae=vae,
        dino=dino,
        schedule=schedule,
        image_size=params.get("image_size", 64),
        latent_channels=params.get("channels", 4),
    )


def load_config(path: str | Path) -> AnyDoorConfig:
    """Read an upstream-layout YAML (``anydoor.yaml`` or a case's ``model.yaml``), or a preset name."""
    if str(path) in PRESETS:
        return PRESETS[str(path)]()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    try:
        return config_from_dict({str(k): v for k, v in raw.items()})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from exc


__all__ = [
    "AnyDoorConfig",
    "ControlNetConfig",
    "DinoV2Config",
    "PRESETS",
    "ScheduleConfig",
    "UNetConfig",
    "VAEConfig",
    "config_from_dict",
    "load_config",
    "released_config",
    "replace",
    "tiny_config",
]
