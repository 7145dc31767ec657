"""The ControlNet (``control_model``) of Zhang et al., "Adding Conditional Control to Text-to-Image Diffusion
Models" (arXiv 2302.05543), as AnyDoor uses it: a trainable copy of the UNet's encoder whose input is the latent
plus an encoding of the 4-channel collage hint; 1x1 "zero" convolutions turn each stage into a residual for the
UNet's skip connections.
"""

from __future__ import annotations

import torch
from torch import nn

from model.config import ControlNetConfig
from model.nn.layers import timestep_embedding
from model.nn.unet import build_encoder, build_time_embed

# Widths of the hint encoder's convolutions; it downsamples the 512x512 hint 8x to the latent grid.
_HINT_WIDTHS = (16, 16, 32, 32, 96, 96, 256)


def _hint_block(hint_channels: int, out_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    ch = hint_channels
    for i, width in enumerate(_HINT_WIDTHS):
        # Stride 2 on the first conv of each new width (16 -> 32 -> 96 -> 256): 3 halvings = 8x.
        stride = 2 if i in (2, 4, 6) else 1
        layers += [nn.Conv2d(ch, width, 3, padding=1, stride=stride), nn.SiLU()]
        ch = width
    layers.append(nn.Conv2d(ch, out_channels, 3, padding=1))
    return nn.Sequential(*layers)  # conv indices 0, 2, ..., 14 as in the checkpoint


class _ZeroConv(nn.Sequential):
    """A 1x1 conv wrapped as upstream does (key ``zero_convs.N.0``)."""

    def __init__(self, channels: int) -> None:
        super().__init__(nn.Conv2d(channels, channels, 1))


class ControlNet(nn.Module):
    def __init__(self, cfg: ControlNetConfig) -> None:
        super().__init__()
        self.config = cfg
        self.time_embed = build_time_embed(cfg)
        self.input_hint_block = _hint_block(cfg.hint_channels, cfg.model_channels)
        self.input_blocks, self.middle_block, skip_channels = build_encoder(cfg)
        self.zero_convs = nn.ModuleList([_ZeroConv(ch) for ch in skip_channels])
        self.middle_block_out = _ZeroConv(cfg.channel_mult[-1] * cfg.model_channels)

    def encode_hint(self, hint: torch.Tensor) -> torch.Tensor:
        """hint (B, hint_channels, 8h, 8w) -> (B, model_channels, h, w). Independent of x and t: the sampler
        computes it once per generation instead of once per step."""
        return self.input_hint_block(hint)

    def forward(
        self,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        hint: torch.Tensor | None = None,
        *,
        guided_hint: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """timesteps (B,), context (B, T, D) -> the residuals for the UNet's skips, then the middle block's:
        len(input_blocks) + 1 tensors. Give either the raw ``hint`` or its precomputed encoding ``guided_hint``.
        Unlike the original ControlNet there is no latent input (see below)."""
        if guided_hint is None:
            if hint is None:
                raise ValueError("ControlNet needs either hint or guided_hint")
            guided_hint = self.encode_hint(hint)
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels))
        # AnyDoor differs from the original ControlNet here: the hint features *replace* the output of the first
        # input block instead of being added to it, so the noisy latent never enters the ControlNet (its
        # ``input_blocks.0`` conv is in the checkpoint but unused). Only the timestep and the ID tokens condition
        # it besides the hint.
        h = guided_hint
        outs = [self.zero_convs[0](h)]
        for block, zero_conv in zip(self.input_blocks[1:], self.zero_convs[1:], strict=True):
            h = block(h, emb, context)
            outs.append(zero_conv(h))
        h = self.middle_block(h, emb, context)
        outs.append(self.middle_block_out(h))
        return outs
