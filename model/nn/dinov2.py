"""AnyDoor's condition encoder: a frozen DINOv2 ViT (ViT-g/14 in the release) followed by a linear projector.

The reference object crop (224x224, RGB in [0, 1]) becomes 257 tokens, the final-normed class token followed by
the 16x16 final-normed patch tokens, projected to the UNet's cross-attention width. Module attribute names follow
the upstream checkpoint (``cond_stage_model.model.*`` / ``cond_stage_model.projector.*``) so that its weights load
key for key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import DinoV2Config

# ImageNet statistics: DINOv2 was trained on inputs normalised with them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LAYER_NORM_EPS = 1e-6


def swiglu_hidden_width(embed_dim: int, mlp_ratio: float) -> int:
    """Hidden width of DINOv2's fused SwiGLU: 2/3 of the MLP width (same parameter count), rounded up to 8."""
    mlp_width = int(embed_dim * mlp_ratio)
    return (int(mlp_width * 2 / 3) + 7) // 8 * 8


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, C / heads)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))  # (B, N, C)


class LayerScale(nn.Module):
    """Per-channel scale on each residual branch (CaiT); ``init_values`` only matters before weights load."""

    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class SwiGLUFFN(nn.Module):
    """SwiGLU feed-forward with the gate and value projections fused into one ``w12`` linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)  # each (B, N, hidden)
        return self.w3(F.silu(gate) * value)


class Block(nn.Module):
    """Pre-norm transformer block with layer scale on both residual branches."""

    def __init__(self, config: DinoV2Config) -> None:
        super().__init__()
        dim = config.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, config.num_heads)
        # Upstream omits layer scale (and its checkpoint keys) when init_values is unset or zero.
        self.ls1 = LayerScale(dim, config.init_values) if config.init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = SwiGLUFFN(dim, swiglu_hidden_width(dim, config.mlp_ratio))
        self.ls2 = LayerScale(dim, config.init_values) if config.init_values else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, config: DinoV2Config) -> None:
        super().__init__()
        p = config.patch_size
        self.proj = nn.Conv2d(3, config.embed_dim, kernel_size=p, stride=p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h * w, C)


class VisionTransformer(nn.Module):
    """The DINOv2 backbone up to its final LayerNorm (``forward_features``); it has no head."""

    def __init__(self, config: DinoV2Config) -> None:
        super().__init__()
        dim = config.embed_dim
        self.patch_size = config.patch_size
        self.grid = config.img_size // config.patch_size  # 37 for 518 / 14: the grid pos_embed was trained on
        self.patch_embed = PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid**2, dim))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        # Used only for masked-image training; kept so that the checkpoint loads strictly.
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self._pos_cache: tuple[tuple[object, ...], torch.Tensor] | None = None

    def _interpolate_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """Resample the grid x grid position embedding to h x w patches, exactly as upstream does."""
        pos = self.pos_embed.float()
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]  # (1, 1, C), (1, grid^2, C)
        dim = pos.shape[-1]
        grid = patch_pos.reshape(1, self.grid, self.grid, dim).permute(0, 3, 1, 2)  # (1, C, grid, grid)
        # Upstream passes a scale factor of (h + 0.1) / grid rather than the target size, to dodge a floor()
        # rounding the output down by one (https://github.com/facebookresearch/dino/issues/8). With a scale
        # factor, PyTorch maps output pixels back through 1 / scale instead of grid / h, so the sampling points
        # (and the numbers) differ from size=(h, w): we must pass the same scale factor to reproduce them.
        scale = ((h + 0.1) / self.grid, (w + 0.1) / self.grid)
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic")  # (1, C, h, w)
        assert grid.shape[-2:] == (h, w), f"position embedding resampled to {tuple(grid.shape[-2:])}, not {(h, w)}"
        patch_pos = grid.permute(0, 2, 3, 1).reshape(1, h * w, dim)
        return torch.cat([cls_pos, patch_pos], dim=1).to(self.pos_embed.dtype)  # (1, 1 + h * w, C)

    def position_embedding(self, h: int, w: int) -> torch.Tensor:
        """Position embedding for an h x w patch grid, (1, 1 + h * w, C); cached per grid size and weights."""
        if (h, w) == (self.grid, self.grid):
            return self.pos_embed
        if torch.is_grad_enabled() and self.pos_embed.requires_grad:
            return self._interpolate_pos_embed(h, w)  # keep the autograd graph; never cache it
        # The key changes whenever pos_embed is replaced (.to(), load_state_dict(assign=True)) or written in
        # place (load_state_dict copies, bumping the version counter). Writes through `.data` bypass that
        # counter and would go unnoticed: load weights with load_state_dict.
        p = self.pos_embed
        key = (h, w, p.device, p.dtype, p.data_ptr(), p._version)
        if self._pos_cache is None or self._pos_cache[0] != key:
            with torch.no_grad():
                self._pos_cache = (key, self._interpolate_pos_embed(h, w))
        return self._pos_cache[1]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W), normalised, H and W multiples of the patch size -> normed tokens (B, 1 + N, C)."""
        b, _, height, width = x.shape
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {self.patch_size}")
        tokens = self.patch_embed(x)  # (B, N, C)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)  # (B, 1 + N, C)
        tokens = tokens + self.position_embedding(height // self.patch_size, width // self.patch_size)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)


class DinoV2Encoder(nn.Module):
    """Reference image (B, 3, S, S) in [0, 1], S = ``config.input_size`` -> condition tokens (B, 257, context)."""

    image_mean: torch.Tensor
    image_std: torch.Tensor

    def __init__(self, config: DinoV2Config) -> None:
        super().__init__()
        self.input_size = config.input_size
        self.model = VisionTransformer(config)
        self.projector = nn.Linear(config.embed_dim, config.context_dim)
        # Constants, not weights: non-persistent so that they stay out of the state dict.
        self.register_buffer("image_mean", torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1), persistent=False)

    def reset_nonpersistent_buffers(self, device: torch.device | str | None = None) -> None:
        """Recreate the normalisation constants (needed after a meta-device build loaded with ``assign``)."""
        self.image_mean = torch.tensor(IMAGENET_MEAN, device=device).reshape(1, 3, 1, 1)
        self.image_std = torch.tensor(IMAGENET_STD, device=device).reshape(1, 3, 1, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.projector(self.features(images))  # (B, 1 + N, context_dim)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> the backbone's (B, 1 + N, C) tokens: [class token, patch tokens], final-normed."""
        expected = (3, self.input_size, self.input_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"DinoV2Encoder expects images of shape (B, {', '.join(map(str, expected))}) in [0, 1], "
                f"got {tuple(images.shape)}"
            )
        x = (images - self.image_mean) / self.image_std  # (B, 3, S, S)
        return self.model.forward_features(x)


__all__ = ["DinoV2Encoder", "VisionTransformer", "swiglu_hidden_width"]
