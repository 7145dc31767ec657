"""Building blocks shared by the SD-2.x UNet and its ControlNet.

Module and attribute names follow the upstream checkpoint (``in_layers``, ``emb_layers``, ``out_layers``,
``skip_connection``, ``transformer_blocks.0.attn1.to_q``, ...), including the positions of parameter-free layers
(SiLU, Dropout), so that weights load key for key.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps, ``[cos | sin]`` as in the DDPM/LDM code (not ``[sin | cos]``)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb  # (B, dim)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype: fp16 statistics over 32 groups lose too much."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    return GroupNorm32(32, channels)


def add_into(fresh: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``fresh + other``, written into ``fresh`` when that gives the same tensor (same dtype and shape after
    promotion and broadcasting) and no autograd graph is recorded. ``fresh`` must be a temporary the caller owns.
    The sum is bit-identical either way; in place it spares allocating and filling one more activation-sized
    buffer, which on the CPU costs about as much as the add itself."""
    if torch.is_grad_enabled() or torch.promote_types(fresh.dtype, other.dtype) != fresh.dtype:
        return fresh + other
    if torch.broadcast_shapes(fresh.shape, other.shape) != fresh.shape:
        return fresh + other
    return fresh.add_(other)


class TimestepBlock(nn.Module):
    """A block whose forward also takes the timestep embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class Sequential(nn.Sequential):
    """Runs its children in order, giving each the inputs it takes (``emb`` to res blocks, ``context`` to
    transformers). Upstream calls this ``TimestepEmbedSequential``; it adds no keys of its own."""

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, emb: torch.Tensor | None = None, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, TimestepBlock):
                assert emb is not None
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class ResBlock(TimestepBlock):
    """Two 3x3 convolutions with the timestep embedding added in between (scale-shift off in SD 2.x)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        out_channels = out_channels or channels
        # The SiLUs after a GroupNorm run in place on the norm's fresh output (no keys, same values).
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(inplace=True), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        # Index 2 is upstream's Dropout (a no-op at inference); kept so the conv stays at index 3.
        self.out_layers = nn.Sequential(
            normalization(out_channels), nn.SiLU(inplace=True), nn.Identity(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection: nn.Module = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)  # (B, C_out, H, W), a fresh conv output: the adds below may write into it
        h = add_into(h, self.emb_layers(emb).to(h.dtype)[:, :, None, None])
        h = self.out_layers(h)
        return add_into(h, self.skip_connection(x))


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16:
            # Nearest upsampling has no bf16 kernel on some PyTorch builds.
            return self.conv(F.interpolate(x.float(), scale_factor=2.0, mode="nearest").to(x.dtype))
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Attention(nn.Module):
    """Multi-head attention (self when ``context`` is None, else cross) through PyTorch SDPA."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None) -> None:
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Identity())  # index 1: upstream's Dropout

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context.to(x.dtype)
        b, n, _ = x.shape
        q = self.to_q(x).view(b, n, self.heads, -1).transpose(1, 2)  # (B, heads, N, d)
        k = self.to_k(context).view(b, context.shape[1], self.heads, -1).transpose(1, 2)  # (B, heads, M, d)
        v = self.to_v(context).view(b, context.shape[1], self.heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return F.gelu(gate).mul_(x)  # gelu's output is a fresh tensor: multiply into it


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the ID tokens, and a GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int) -> None:
        super().__init__()
        self.attn1 = Attention(dim, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = Attention(dim, heads, dim_head, context_dim=context_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        # Each branch's output is a fresh tensor; the residual is added into it (a + b == b + a, bit for bit).
        x = add_into(self.attn1(self.norm1(x)), x)
        x = add_into(self.attn2(self.norm2(x), context), x)
        return add_into(self.ff(self.norm3(x)), x)


class SpatialTransformer(nn.Module):
    """Transformer over the H*W positions of a feature map, with linear in/out projections (SD 2.x)."""

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int) -> None:
        super().__init__()
        inner = heads * dim_head
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)]
        )
        self.proj_out = nn.Linear(inner, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        x = self.proj_out(x)
        # The result must be contiguous NCHW: the transposed view is channels-last in memory, and PyTorch's CPU
        # GroupNorm is measurably less precise on that layout (~1e-3 on eps with the reference weights). With the
        # contiguous x_in as the first operand the add itself writes contiguous NCHW: no separate copy.
        return x_in + x.transpose(1, 2).reshape(b, c, h, w)
