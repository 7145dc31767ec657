"""DINOv2 condition encoder: parity with upstream tokens, checkpoint layout, and behaviour."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import REFERENCE, Case, rel_l2
from safetensors.torch import load_file

from model.config import DinoV2Config, load_config
from model.nn.dinov2 import DinoV2Encoder, swiglu_hidden_width

PREFIX = "cond_stage_model."


def case_weights(case: Case) -> dict[str, torch.Tensor]:
    """The case's encoder weights under our key names, cast from float16 storage to float32."""
    tensors = load_file(case.weights)
    return {k.removeprefix(PREFIX): v.float() for k, v in tensors.items() if k.startswith(PREFIX)}


def load_encoder(case: Case) -> DinoV2Encoder:
    encoder = DinoV2Encoder(load_config(case.config_path).dino).eval()
    encoder.load_state_dict(case_weights(case), strict=True)
    return encoder


def as_batch(image_hwc: torch.Tensor) -> torch.Tensor:
    return image_hwc.permute(2, 0, 1).unsqueeze(0).contiguous()  # (H, W, 3) -> (1, 3, H, W)


@pytest.fixture(scope="module")
def encoder(case: Case) -> DinoV2Encoder:
    return load_encoder(case)


@pytest.fixture(scope="module")
def ref_image(case: Case) -> torch.Tensor:
    return as_batch(torch.from_numpy(case.expected["ref"]))  # (1, 3, 224, 224) in [0, 1]


@pytest.mark.parity
@torch.no_grad()
def test_tokens_match_reference(encoder: DinoV2Encoder, ref_image: torch.Tensor, case: Case) -> None:
    cond = encoder(ref_image)
    uncond = encoder(torch.zeros_like(ref_image))
    cond_err = rel_l2(cond, case.expected["cond_tokens"])
    uncond_err = rel_l2(uncond, case.expected["uncond_tokens"])
    assert cond_err < 1e-4, f"{case.name}: cond tokens rel L2 {cond_err:.3g}"
    assert uncond_err < 1e-4, f"{case.name}: uncond tokens rel L2 {uncond_err:.3g}"


@pytest.mark.parity
@torch.no_grad()
def test_position_cache_follows_reloaded_weights() -> None:
    """Reloading weights in place must not reuse the position embedding interpolated from the old ones."""
    first, second = Case("case_a"), Case("case_c")
    encoder = load_encoder(first)
    image = as_batch(torch.from_numpy(first.expected["ref"]))
    assert rel_l2(encoder(image), first.expected["cond_tokens"]) < 1e-4
    keys_before = set(encoder.state_dict())

    encoder.load_state_dict(case_weights(second), strict=True)
    image = as_batch(torch.from_numpy(second.expected["ref"]))
    assert rel_l2(encoder(image), second.expected["cond_tokens"]) < 1e-4
    assert set(encoder.state_dict()) == keys_before, "the cached position embedding leaked into the state dict"


def test_state_dict_matches_release_manifest() -> None:
    manifest = json.loads((REFERENCE / "anydoor_state_dict.json").read_text())
    expected = {k.removeprefix(PREFIX): tuple(shape) for k, (shape, _) in manifest.items() if k.startswith(PREFIX)}
    with torch.device("meta"):
        encoder = DinoV2Encoder(DinoV2Config())
    actual = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    assert sorted(set(expected) - set(actual)) == [], "missing keys"
    assert sorted(set(actual) - set(expected)) == [], "unexpected keys"
    assert actual == expected


def test_swiglu_hidden_width() -> None:
    assert swiglu_hidden_width(1536, 4.0) == 4096  # ViT-g/14
    assert swiglu_hidden_width(64, 4.0) == 176  # the reference cases' tiny ViT


@torch.no_grad()
def test_batch_matches_single_images(encoder: DinoV2Encoder, ref_image: torch.Tensor) -> None:
    images = torch.cat([ref_image, ref_image.flip(-1) * 0.5])  # (2, 3, 224, 224)
    batched = encoder(images)
    for i in range(2):
        single = encoder(images[i : i + 1])
        assert rel_l2(batched[i : i + 1], single) < 1e-5


@torch.no_grad()
def test_output_shape(encoder: DinoV2Encoder, case: Case) -> None:
    config = load_config(case.config_path).dino
    tokens = encoder(torch.rand(3, 3, 224, 224))
    assert tokens.shape == (3, config.num_tokens, config.context_dim) == (3, 257, 32)
    assert tokens.dtype == torch.float32


@pytest.mark.parametrize("shape", [(1, 3, 518, 518), (1, 3, 224, 210), (1, 4, 224, 224), (3, 224, 224)])
def test_wrong_input_shape_is_rejected(encoder: DinoV2Encoder, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"\(B, 3, 224, 224\)"):
        encoder(torch.zeros(shape))


def test_native_grid_uses_the_trained_position_embedding(encoder: DinoV2Encoder) -> None:
    assert encoder.model.position_embedding(37, 37) is encoder.model.pos_embed


@torch.no_grad()
def test_position_embedding_resampling_follows_upstream_scale_factor(encoder: DinoV2Encoder) -> None:
    """Upstream resamples 37x37 -> 16x16 with scale factor 16.1 / 37, which samples differently from size=16."""
    vit = encoder.model
    pos = vit.position_embedding(16, 16)  # (1, 257, C)
    assert pos.shape == (1, 257, vit.pos_embed.shape[-1])
    assert torch.equal(pos[:, 0], vit.pos_embed[:, 0]), "the class token's position must pass through unchanged"

    dim = vit.pos_embed.shape[-1]
    grid = vit.pos_embed[:, 1:].reshape(1, 37, 37, dim).permute(0, 3, 1, 2)
    by_size = F.interpolate(grid, size=(16, 16), mode="bicubic").permute(0, 2, 3, 1).reshape(1, 256, dim)
    assert rel_l2(pos[:, 1:], by_size) > 1e-3, "resampling by target size would not reproduce upstream"
