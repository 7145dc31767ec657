"""KL-VAE: parity with the upstream encoder mean and decode, checkpoint layout, and behaviour."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REFERENCE, Case, rel_l2
from safetensors.torch import load_file

from model.config import VAEConfig, load_config
from model.nn.vae import LOGVAR_MAX, AutoencoderKL

PREFIX = "first_stage_model."
SCALE_FACTOR = 0.18215


@pytest.fixture(scope="module")
def vae(case: Case) -> AutoencoderKL:
    model = AutoencoderKL(load_config(case.config_path).vae).eval()
    tensors = load_file(case.weights)
    weights = {k.removeprefix(PREFIX): v.float() for k, v in tensors.items() if k.startswith(PREFIX)}
    model.load_state_dict(weights, strict=True)
    return model


@pytest.mark.parity
@torch.no_grad()
def test_encoder_mean_matches_reference(vae: AutoencoderKL, case: Case) -> None:
    image = torch.from_numpy(case.expected["jpg"]).permute(2, 0, 1).unsqueeze(0).contiguous()  # (1, 3, 512, 512)
    mean, logvar = vae.encode(image)
    err = rel_l2(mean, case.expected["vae_encoder_mean"])
    assert err < 1e-4, f"{case.name}: encoder mean rel L2 {err:.3g}"
    assert logvar.shape == mean.shape == (1, 4, 64, 64)


@pytest.mark.parity
@torch.no_grad()
def test_decode_matches_reference(vae: AutoencoderKL, case: Case) -> None:
    # Upstream's decode_first_stage unscales as `1. / scale_factor * z`.
    z = 1.0 / SCALE_FACTOR * torch.from_numpy(case.expected["samples"])  # (1, 4, 64, 64)
    decoded = vae.decode(z)
    err = rel_l2(decoded, case.expected["decoded"])
    assert err < 1e-4, f"{case.name}: decoded rel L2 {err:.3g}"


def manifest_entries(prefix: str) -> dict[str, tuple[int, ...]]:
    manifest = json.loads((REFERENCE / "anydoor_state_dict.json").read_text())
    return {k.removeprefix(prefix): tuple(shape) for k, (shape, _) in manifest.items() if k.startswith(prefix)}


def test_state_dict_matches_release_manifest() -> None:
    expected = manifest_entries(PREFIX)
    with torch.device("meta"):
        model = AutoencoderKL(VAEConfig())
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(expected) - set(actual)) == [], "missing keys"
    assert sorted(set(actual) - set(expected)) == [], "unexpected keys"
    assert actual == expected


@torch.no_grad()
def test_batch_matches_single_items(vae: AutoencoderKL) -> None:
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    means, logvars = vae.encode(images)
    latents = torch.randn(2, 4, 8, 8)
    decoded = vae.decode(latents)
    for i in range(2):
        mean, logvar = vae.encode(images[i : i + 1])
        assert rel_l2(means[i : i + 1], mean) < 1e-5
        assert rel_l2(logvars[i : i + 1], logvar) < 1e-5
        assert rel_l2(decoded[i : i + 1], vae.decode(latents[i : i + 1])) < 1e-5


@torch.no_grad()
def test_shapes(vae: AutoencoderKL) -> None:
    mean, logvar = vae.encode(torch.zeros(2, 3, 64, 96))
    assert mean.shape == logvar.shape == (2, 4, 8, 12)
    assert vae.decode(mean).shape == (2, 3, 64, 96)


@pytest.mark.parametrize("shape", [(1, 3, 60, 64), (1, 4, 64, 64), (3, 64, 64)])
def test_encode_rejects_bad_shapes(vae: AutoencoderKL, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(torch.zeros(shape))


def test_decode_rejects_bad_channels(vae: AutoencoderKL) -> None:
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\)"):
        vae.decode(torch.zeros(1, 3, 8, 8))


@torch.no_grad()
def test_logvar_is_clamped_like_upstream() -> None:
    model = AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 1), num_res_blocks=1)).eval()
    # Constant moments: mean and logvar both 100, beyond the clamp.
    model.quant_conv.load_state_dict({"weight": torch.zeros(8, 8, 1, 1), "bias": torch.full((8,), 100.0)})
    mean, logvar = model.encode(torch.zeros(1, 3, 16, 16))
    assert torch.all(mean == 100.0)
    assert torch.all(logvar == LOGVAR_MAX)


@torch.no_grad()
def test_attn_resolutions_add_attention_where_upstream_does() -> None:
    # Nominal resolution 32 with two levels: the encoder's level 1 and the decoder's level 1 run at 16.
    config = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), resolution=32)
    model = AutoencoderKL(config).eval()
    attn_blocks = {".".join(k.split(".")[:5]) for k in model.state_dict() if ".attn." in k}  # not the mid attn_1
    assert attn_blocks == {"encoder.down.1.attn.0", "decoder.up.1.attn.0", "decoder.up.1.attn.1"}
    mean, _ = model.encode(torch.rand(1, 3, 32, 32))
    assert mean.shape == (1, 4, 16, 16)
    assert model.decode(mean).shape == (1, 3, 32, 32)
