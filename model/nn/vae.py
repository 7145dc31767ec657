"""The KL autoencoder (``first_stage_model``, ldm's AutoencoderKL) that maps 512x512 images to 64x64 latents.

Images are in [-1, 1]; latents here are unscaled, i.e. before multiplying by the 0.18215 latent scale that the
diffusion model works in. Module attribute names follow the upstream checkpoint (``first_stage_model.*``) so that
its weights load key for key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import VAEConfig

# DiagonalGaussianDistribution's clamp on the log-variance, which keeps exp(logvar) finite.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        # A 1x1 projection on the skip only where the width changes (upstream's "nin" shortcut).
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions, with 1x1-conv projections."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        h = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, 1, c, height * width).transpose(2, 3)  # (B, 1, HW, C): one head

        out = F.scaled_dot_product_attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)))
        out = out.transpose(2, 3).reshape(b, c, height, width)  # (B, C, H, W), contiguous
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Upstream pads one zero row/column at the bottom/right only, then convolves without padding.
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H / 2, W / 2)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class Level(nn.Module):
    """One resolution of the encoder or decoder: res blocks, each followed by attention where configured."""

    def __init__(self, widths: list[tuple[int, int]], with_attn: bool) -> None:
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(cin, cout) for cin, cout in widths)
        self.attn = nn.ModuleList(AttnBlock(cout) for _, cout in widths) if with_attn else nn.ModuleList()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return x


class DownLevel(Level):
    def __init__(self, widths: list[tuple[int, int]], with_attn: bool, downsample: bool) -> None:
        super().__init__(widths, with_attn)
        self.downsample = Downsample(widths[-1][1]) if downsample else None  # none after the last level

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        return x if self.downsample is None else self.downsample(x)


class UpLevel(Level):
    def __init__(self, widths: list[tuple[int, int]], with_attn: bool, upsample: bool) -> None:
        super().__init__(widths, with_attn)
        self.upsample = Upsample(widths[-1][1]) if upsample else None  # none after the full-resolution level

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        return x if self.upsample is None else self.upsample(x)


class Mid(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> posterior moments (B, 2 * z_channels, H / f, W / f), f = 2^(levels - 1)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        widths = [config.ch * m for m in config.ch_mult]
        self.conv_in = nn.Conv2d(config.in_channels, config.ch, kernel_size=3, padding=1)
        # attn_resolutions name the nominal side length (``resolution`` halved per level), as upstream.
        res, cin = config.resolution, config.ch
        self.down = nn.ModuleList()
        for i, cout in enumerate(widths):
            last = i == len(widths) - 1
            pairs = [(cin if j == 0 else cout, cout) for j in range(config.num_res_blocks)]
            self.down.append(DownLevel(pairs, res in config.attn_resolutions, downsample=not last))
            cin, res = cout, res if last else res // 2
        self.mid = Mid(cin)
        self.norm_out = group_norm(cin)
        self.conv_out = nn.Conv2d(cin, 2 * config.z_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.down:
            h = level(h)
        h = self.mid(h)  # (B, ch * ch_mult[-1], H / f, W / f)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_ch, h * f, w * f)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        widths = [config.ch * m for m in config.ch_mult]
        cin = widths[-1]
        res = config.resolution // 2 ** (len(widths) - 1)
        self.conv_in = nn.Conv2d(config.z_channels, cin, kernel_size=3, padding=1)
        self.mid = Mid(cin)
        # Built from the lowest resolution up, but stored so that up[i] is the level of ch_mult[i] (as upstream).
        levels: list[UpLevel] = []
        for i in reversed(range(len(widths))):
            cout = widths[i]
            pairs = [(cin if j == 0 else cout, cout) for j in range(config.num_res_blocks + 1)]
            levels.insert(0, UpLevel(pairs, res in config.attn_resolutions, upsample=i != 0))
            cin, res = cout, res * 2 if i != 0 else res
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(cin)
        self.conv_out = nn.Conv2d(cin, config.out_ch, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # (B, ch * ch_mult[-1], h, w)
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out_ch, h * f, w * f)


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.downscale = 2 ** (len(config.ch_mult) - 1)
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, kernel_size=1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image (B, 3, H, W) in [-1, 1] -> posterior (mean, logvar), each (B, embed_dim, H / 8, W / 8), unscaled."""
        f = self.downscale
        if x.ndim != 4 or x.shape[1] != self.config.in_channels or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(
                f"AutoencoderKL.encode expects (B, {self.config.in_channels}, H, W) with H and W multiples of {f}, "
                f"got {tuple(x.shape)}"
            )
        moments = self.quant_conv(self.encoder(x))  # (B, 2 * embed_dim, H / f, W / f)
        mean, logvar = moments.chunk(2, dim=1)
        return mean.contiguous(), logvar.clamp(LOGVAR_MIN, LOGVAR_MAX).contiguous()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latent (B, embed_dim, h, w) -> image (B, 3, 8h, 8w), roughly in [-1, 1] (not clipped)."""
        if z.ndim != 4 or z.shape[1] != self.config.embed_dim:
            raise ValueError(f"AutoencoderKL.decode expects (B, {self.config.embed_dim}, h, w), got {tuple(z.shape)}")
        return self.decoder(self.post_quant_conv(z))


__all__ = ["AutoencoderKL", "Decoder", "Encoder"]
