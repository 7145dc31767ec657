"""CLIP's image tower, for the CLIP-I score of ``anydoor eval`` (optional: only with ``--clip-weights``).

A pre-norm ViT: the image (normalised with CLIP's statistics) is cut into patches by a bias-free convolution, a
class embedding is prepended and the positions added, ``ln_pre`` normalises the tokens, residual blocks of
multi-head attention and a two-layer MLP follow (QuickGELU, ``x * sigmoid(1.702 x)``, in OpenAI's models; GELU in
some open_clip ones), and the ``ln_post``-normed class token times ``proj`` is the image embedding.

Module names follow OpenAI's and open_clip's checkpoints (``visual.conv1``, ``visual.transformer.resblocks.N.attn
.in_proj_weight``...), so their vision weights load key for key; Hugging Face ``CLIPModel`` /
``CLIPVisionModelWithProjection`` checkpoints (``vision_model.*``, ``visual_projection.weight``) are renamed on
load. The architecture is read from the tensor shapes; the head count, which the shapes do not give, is the width
over 64 (every OpenAI model) unless a Hugging Face ``config.json`` beside the weights or the caller says otherwise.
"""

from __future__ import annotations

import json
import re
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from model.weights.checkpoint import CheckpointError, WeightsFile

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ACTIVATIONS = ("quick_gelu", "gelu")


@dataclass(frozen=True)
class ClipVisionConfig:
    width: int
    layers: int
    heads: int
    patch_size: int
    image_size: int
    embed_dim: int  # the projection's output: the image embedding's size
    mlp_width: int
    activation: str = "quick_gelu"
    eps: float = 1e-5


class ResidualAttentionBlock(nn.Module):
    def __init__(self, config: ClipVisionConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.ln_1 = nn.LayerNorm(config.width, eps=config.eps)
        self.attn = _Attention(config.width)
        self.ln_2 = nn.LayerNorm(config.width, eps=config.eps)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(config.width, config.mlp_width))
        self.mlp.add_module("gelu", _QuickGELU() if config.activation == "quick_gelu" else nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(config.mlp_width, config.width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), self.heads)
        return x + self.mlp(self.ln_2(x))


class _Attention(nn.Module):
    """Self-attention with the packed ``in_proj`` of ``torch.nn.MultiheadAttention`` (the checkpoints' layout)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        b, n, c = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class _QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class _Transformer(nn.Module):
    def __init__(self, config: ClipVisionConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(config) for _ in range(config.layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class ClipVisionTransformer(nn.Module):
    """(B, 3, S, S) images in [0, 1] -> (B, embed_dim) CLIP image embeddings (not normalised)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, config: ClipVisionConfig) -> None:
        super().__init__()
        self.config = config
        grid = config.image_size // config.patch_size
        self.conv1 = nn.Conv2d(3, config.width, config.patch_size, stride=config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(config.width))
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, config.width))
        self.ln_pre = nn.LayerNorm(config.width, eps=config.eps)
        self.transformer = _Transformer(config)
        self.ln_post = nn.LayerNorm(config.width, eps=config.eps)
        self.proj = nn.Parameter(torch.zeros(config.width, config.embed_dim))
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images, square, at any size -> the model's input: resized (bicubic) and standardised."""
        size = self.config.image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bicubic", antialias=True,
                                   align_corners=False).clamp(0, 1)
        return (images - self.mean) / self.std

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Standardised (B, 3, image_size, image_size) pixels -> (B, embed_dim)."""
        x = self.conv1(pixels.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)  # (B, N, C)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(self.normalize(images.to(device=self.mean.device, dtype=torch.float32))).float()


# --- loading ----------------------------------------------------------------------------------------------------

_HF_RENAMES = (
    (r"^vision_model\.embeddings\.patch_embedding\.weight$", "conv1.weight"),
    (r"^vision_model\.embeddings\.class_embedding$", "class_embedding"),
    (r"^vision_model\.embeddings\.position_embedding\.weight$", "positional_embedding"),
    (r"^vision_model\.pre_layrnorm\.", "ln_pre."),
    (r"^vision_model\.post_layernorm\.", "ln_post."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm1\.", r"transformer.resblocks.\1.ln_1."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm2\.", r"transformer.resblocks.\1.ln_2."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.fc1\.", r"transformer.resblocks.\1.mlp.c_fc."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.fc2\.", r"transformer.resblocks.\1.mlp.c_proj."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"transformer.resblocks.\1.attn.out_proj."),
)
_HF_QKV = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a weights file: safetensors, a PyTorch state dict, or a TorchScript archive (OpenAI's)."""
    if path.suffix in (".pt", ".pth") and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            scripted = any(name.endswith("/constants.pkl") for name in archive.namelist())
        if scripted:  # OpenAI's released files are TorchScript: code that runs no Python, and its state dict
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 deprecates jit.load
                    module = torch.jit.load(str(path), map_location="cpu")
            except RuntimeError as exc:
                raise CheckpointError(f"{path}: cannot read TorchScript archive ({exc})") from exc
            return {k: v.detach() for k, v in module.state_dict().items()}
    weights = WeightsFile(path)
    return {key: weights.tensor(key) for key in weights.keys()}


def vision_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The image tower's tensors of a CLIP checkpoint, under this module's names."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("vision_model.") for k in state):
        out: dict[str, torch.Tensor] = {}
        qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        for key, value in state.items():
            if key == "visual_projection.weight":
                out["proj"] = value.t().contiguous()
                continue
            found = _HF_QKV.match(key)
            if found:
                qkv.setdefault((int(found.group(1)), found.group(3)), {})[found.group(2)] = value
                continue
            for pattern, replacement in _HF_RENAMES:
                renamed, count = re.subn(pattern, replacement, key)
                if count:
                    out[renamed] = value
                    break
        for (layer, kind), parts in qkv.items():
            if set(parts) != {"q", "k", "v"}:
                raise CheckpointError(f"layer {layer} lacks one of its q, k, v projections")
            out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"],
                                                                                  parts["v"]])
        return out
    prefix = "visual." if any(k.startswith("visual.") for k in state) else ""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def config_of(state: Mapping[str, torch.Tensor], *, heads: int | None = None,
              activation: str = "quick_gelu") -> ClipVisionConfig:
    """The architecture the tensors describe (ViT image towers only: OpenAI's ResNets are not supported)."""
    missing = [k for k in ("conv1.weight", "positional_embedding", "proj", "ln_post.weight") if k not in state]
    if missing:
        hint = " (a ResNet CLIP? only ViT image towers are supported)" if "layer1.0.conv1.weight" in state else ""
        raise CheckpointError(f"not a CLIP ViT image tower: no {', '.join(missing)}{hint}")
    width, _, patch, _ = state["conv1.weight"].shape
    tokens = state["positional_embedding"].shape[0]
    grid = round((tokens - 1) ** 0.5)
    if grid * grid + 1 != tokens:
        raise CheckpointError(f"positional_embedding has {tokens} rows: not a square grid and a class token")
    layers = len({int(m.group(1)) for k in state if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))})
    heads = heads or max(1, width // 64)
    if width % heads:
        raise CheckpointError(f"a width of {width} does not split into {heads} heads")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}")
    return ClipVisionConfig(width=width, layers=layers, heads=heads, patch_size=patch, image_size=grid * patch,
                            embed_dim=state["proj"].shape[1],
                            mlp_width=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                            activation=activation)


def _hf_config(path: Path) -> dict[str, object]:
    """A Hugging Face ``config.json`` beside the weights: its vision settings (heads, activation, eps)."""
    config_path = path.parent / "config.json"
    if not config_path.is_file():
        return {}
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    vision = config.get("vision_config", config) if isinstance(config, dict) else {}
    return vision if isinstance(vision, dict) else {}


def load_clip_vision(path: str | Path, *, heads: int | None = None, activation: str | None = None,
                     device: torch.device | str = "cpu") -> ClipVisionTransformer:
    """The CLIP image tower in ``path`` (see the module docstring), in float32 and eval mode.

    ``heads`` and ``activation`` default to a ``config.json`` beside the file (Hugging Face), else to OpenAI's
    (width / 64, QuickGELU)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CLIP weights not found: {path}")
    state = vision_state(_read_state(path))
    hf = _hf_config(path)
    hf_heads = hf.get("num_attention_heads")
    hf_act = hf.get("hidden_act")
    config = config_of(state, heads=heads or (hf_heads if isinstance(hf_heads, int) else None),
                       activation=activation or (hf_act if hf_act in ACTIVATIONS else "quick_gelu"))
    if isinstance(hf.get("layer_norm_eps"), float):
        config = ClipVisionConfig(**{**config.__dict__, "eps": hf["layer_norm_eps"]})
    model = ClipVisionTransformer(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items() if k in expected}
    wrong = [f"{k} {found[k]} (expected {expected[k]})" for k in found if found[k] != expected[k]]
    absent = sorted(set(expected) - set(found))
    if wrong or absent:
        raise CheckpointError(f"{path}: not a CLIP image tower this loader reads: "
                              + "; ".join([*(f"missing {k}" for k in absent[:5]), *wrong[:5]]))
    model.load_state_dict({k: state[k].float() for k in expected})
    return model.to(device).eval().requires_grad_(False)
