"""The Stable Diffusion 2.1 UNet (``model.diffusion_model``) with ControlNet residual injection.

Architecture of Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models" (arXiv 2112.10752),
in its SD-2.x form (linear projections in the spatial transformers, a fixed head width); the control residuals
are added to the skip connections as in Zhang et al., "Adding Conditional Control to Text-to-Image Diffusion
Models" (arXiv 2302.05543). Module indices equal the upstream checkpoint's (``input_blocks.N.M``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from model.config import UNetConfig
from model.nn.layers import (
    Downsample,
    ResBlock,
    Sequential,
    SpatialTransformer,
    Upsample,
    add_into,
    normalization,
    timestep_embedding,
)


def _transformer(cfg: UNetConfig, channels: int) -> SpatialTransformer:
    heads = channels // cfg.num_head_channels
    return SpatialTransformer(channels, heads, cfg.num_head_channels, cfg.transformer_depth, cfg.context_dim)


def build_time_embed(cfg: UNetConfig) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(cfg.model_channels, cfg.time_embed_dim), nn.SiLU(), nn.Linear(cfg.time_embed_dim, cfg.time_embed_dim)
    )


def build_encoder(cfg: UNetConfig) -> tuple[nn.ModuleList, Sequential, list[int]]:
    """The down path and middle block shared by the UNet and the ControlNet.

    Returns ``(input_blocks, middle_block, skip_channels)``: one skip per input block, in order.
    """
    mc, emb = cfg.model_channels, cfg.time_embed_dim
    blocks = nn.ModuleList([Sequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
    skip_channels = [mc]
    ch, ds = mc, 1
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            layers: list[nn.Module] = [ResBlock(ch, emb, mult * mc)]
            ch = mult * mc
            if ds in cfg.attention_resolutions:
                layers.append(_transformer(cfg, ch))
            blocks.append(Sequential(*layers))
            skip_channels.append(ch)
        if level != len(cfg.channel_mult) - 1:
            blocks.append(Sequential(Downsample(ch)))
            skip_channels.append(ch)
            ds *= 2
    middle = Sequential(ResBlock(ch, emb), _transformer(cfg, ch), ResBlock(ch, emb))
    return blocks, middle, skip_channels


class UNetModel(nn.Module):
    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.config = cfg
        mc, emb = cfg.model_channels, cfg.time_embed_dim
        self.time_embed = build_time_embed(cfg)
        self.input_blocks, self.middle_block, skip_channels = build_encoder(cfg)

        self.output_blocks = nn.ModuleList()
        ch = cfg.channel_mult[-1] * mc
        ds = 2 ** (len(cfg.channel_mult) - 1)
        for level in reversed(range(len(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers: list[nn.Module] = [ResBlock(ch + skip_channels.pop(), emb, cfg.channel_mult[level] * mc)]
                ch = cfg.channel_mult[level] * mc
                if ds in cfg.attention_resolutions:
                    layers.append(_transformer(cfg, ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(Sequential(*layers))
        assert not skip_channels
        self.out = nn.Sequential(normalization(ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))

    @property
    def num_control_residuals(self) -> int:
        return len(self.input_blocks) + 1

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        control: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x (B, 4, h, w), timesteps (B,), context (B, T, D); control: one residual per skip plus the middle
        block's (13 for SD), already scaled by the control strength. Returns eps (B, 4, h, w)."""
        if control is not None and len(control) != self.num_control_residuals:
            raise ValueError(f"expected {self.num_control_residuals} control residuals, got {len(control)}")
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(x.dtype))  # (B, 4*mc)
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        # The skips are used once each, after the encoder is done with them: the control residuals go into them.
        if control is not None:
            h = add_into(h, control[-1])
        for i, block in enumerate(self.output_blocks):
            skip = skips.pop()
            if control is not None:
                skip = add_into(skip, control[-2 - i])
            h = block(torch.cat([h, skip], dim=1), emb, context)
        return self.out(h)
