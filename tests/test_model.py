"""Fast behaviour tests of the model core: structure, config, sampler, batching and precision."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from model.config import (
    AnyDoorConfig,
    ControlNetConfig,
    DinoV2Config,
    UNetConfig,
    VAEConfig,
    load_config,
    released_config,
    tiny_config,
)
from model.diffusion.samplers import ddim_sample
from model.diffusion.schedule import ddim_timesteps
from model.errors import Cancelled
from model.nn.anydoor import AnyDoorModel
from tests.conftest import REFERENCE


def test_full_size_model_matches_released_manifest() -> None:
    """Every key and shape of the released checkpoint, from anydoor.yaml, built on the meta device."""
    manifest = json.loads((REFERENCE / "anydoor_state_dict.json").read_text())
    config = load_config(REFERENCE / "anydoor.yaml")
    assert config == released_config()
    shapes = AnyDoorModel.expected_shapes(config)
    assert sorted(set(manifest) - set(shapes)) == []
    assert sorted(set(shapes) - set(manifest)) == []
    wrong = {k: (shapes[k], tuple(v[0])) for k, v in manifest.items() if shapes[k] != tuple(v[0])}
    assert wrong == {}
    assert len(shapes) == 1856
    with torch.device("meta"):
        params = sum(p.numel() for p in AnyDoorModel(config).parameters())
    assert 2.40e9 < params < 2.50e9  # "2.45 B parameters"


def test_case_configs_load_as_tiny_preset() -> None:
    for case in ("case_a", "case_c"):
        assert load_config(REFERENCE / case / "model.yaml") == tiny_config()
    assert load_config("tiny") == tiny_config()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: UNetConfig(model_channels=30), "divisible by 32"),
        (lambda: UNetConfig(channel_mult=()), "channel_mult"),
        (lambda: DinoV2Config(embed_dim=100, num_heads=3), "num_heads=3"),
        (lambda: DinoV2Config(ffn_layer="mlp"), "ffn_layer"),
        (lambda: VAEConfig(ch=0), "VAEConfig.ch must be positive"),
        (lambda: AnyDoorConfig(dino=DinoV2Config(context_dim=768)), "context widths must agree"),
        (lambda: AnyDoorConfig(controlnet=ControlNetConfig(model_channels=64)), "controlnet.model_channels"),
    ],
)
def test_config_errors_name_the_value(make, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        make()


def test_yaml_without_model_section_is_rejected(tmp_path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.yaml"
    bad.write_text("foo: 1\n")
    with pytest.raises(ValueError, match="model.params"):
        load_config(bad)


# --- sampler -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 4, 5, 10, 20, 25, 50, 100, 125, 200, 250, 500])
def test_timesteps_equal_upstream_where_steps_divide_1000(steps: int) -> None:
    upstream = [t + 1 for t in range(0, 1000, 1000 // steps)]
    assert ddim_timesteps(steps) == upstream


def test_steps_means_steps_for_every_count() -> None:
    for steps in range(1, 1001):
        ts = ddim_timesteps(steps)
        assert len(ts) == steps == len(set(ts)), steps
        assert ts == sorted(ts) and 0 <= ts[0] and ts[-1] <= 999, steps
    with pytest.raises(ValueError, match="steps must be between 1 and 1000, got 0"):
        ddim_timesteps(0)


@pytest.mark.parametrize("steps", [3, 9, 27, 37, 1000])
def test_sampler_runs_counts_that_crash_upstream(steps: int) -> None:
    calls: list[int] = []
    ac = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2, 0)

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(int(t[0]))
        return torch.zeros_like(x)

    out = ddim_sample(eps, torch.randn(1, 4, 8, 8), ac, steps)
    assert len(calls) == steps and calls == sorted(calls, reverse=True)
    assert torch.isfinite(out).all()


def test_sampler_progress_cancel_and_eta_noise() -> None:
    ac = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2, 0)
    seen: list[tuple[int, int]] = []
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.1 * x

    ddim_sample(eps, x_T, ac, 4, progress=lambda i, n, t: seen.append((i, n)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]

    with pytest.raises(Cancelled):
        ddim_sample(eps, x_T, ac, 4, should_cancel=lambda: len(seen) >= 6,
                    progress=lambda i, n, t: seen.append((i, n)))
    assert len(seen) == 6  # stopped before the third step

    a = ddim_sample(eps, x_T, ac, 4, eta=1.0, generator=torch.Generator().manual_seed(5))
    b = ddim_sample(eps, x_T, ac, 4, eta=1.0, generator=torch.Generator().manual_seed(5))
    c = ddim_sample(eps, x_T, ac, 4, eta=1.0, generator=torch.Generator().manual_seed(6))
    deterministic = ddim_sample(eps, x_T, ac, 4)
    assert torch.equal(a, b) and not torch.allclose(a, c) and not torch.allclose(a, deterministic)


# --- the model on shapes and settings the reference cases do not cover ---------------------------------------


@pytest.fixture(scope="module")
def other_model() -> AnyDoorModel:
    """A differently shaped random model: one res block per level, attention at two levels, depth-2 transformers."""
    trunk = dict(model_channels=32, channel_mult=(1, 2, 2), attention_resolutions=(2, 4), num_res_blocks=1,
                 num_head_channels=32, transformer_depth=2, context_dim=48)
    cfg = AnyDoorConfig(unet=UNetConfig(**trunk), controlnet=ControlNetConfig(**trunk),
                        vae=VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1),
                        dino=DinoV2Config(embed_dim=32, depth=1, num_heads=2, context_dim=48))
    torch.manual_seed(3)
    return AnyDoorModel(cfg).eval()


def test_unet_controlnet_residual_count(other_model: AnyDoorModel) -> None:
    unet = other_model.model.diffusion_model
    assert unet.num_control_residuals == len(other_model.control_model.zero_convs) + 1
    with pytest.raises(ValueError, match="control residuals"):
        unet(torch.randn(1, 4, 16, 16), torch.tensor([10]), torch.randn(1, 5, 48), control=[torch.zeros(1)])


def test_batch_items_are_independent(other_model: AnyDoorModel) -> None:
    """Per-item control strengths in one batch equal separate runs; strength 0 equals no ControlNet."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 16, 24, generator=g)  # a non-square latent
    ctx = torch.randn(3, 7, 48, generator=g)
    hint = torch.rand(3, 4, 128, 192, generator=g) * 2 - 1
    t = torch.tensor([999, 500, 1])
    strengths = torch.tensor([0.0, 0.5, 1.7])
    batched = other_model.predict_noise(x, t, ctx, hint, control_scale=strengths)
    for i in range(3):
        alone = other_model.predict_noise(x[i:i + 1], int(t[i]), ctx[i:i + 1], hint[i:i + 1],
                                          control_scale=float(strengths[i]))
        torch.testing.assert_close(batched[i:i + 1], alone, rtol=1e-4, atol=1e-5)
    no_control = other_model.predict_noise(x[:1], 999, ctx[:1], None, control_scale=0.0)
    torch.testing.assert_close(batched[:1], no_control, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(batched[1:2], other_model.predict_noise(x[1:2], 500, ctx[1:2], None, control_scale=0))


def test_uncond_tokens_cached_and_reset_on_reload(other_model: AnyDoorModel) -> None:
    first = other_model.uncond_tokens(2)
    assert first.shape == (2, other_model.config.dino.num_tokens, 48)
    assert other_model.uncond_tokens(1).data_ptr() == first.data_ptr()  # the same cached tensor
    state = {k: v.clone() for k, v in other_model.state_dict().items()}
    state["cond_stage_model.projector.bias"] += 1.0
    other_model.load_state_dict(state)
    torch.testing.assert_close(other_model.uncond_tokens(1), first[:1] + 1.0, rtol=1e-5, atol=1e-5)


def test_bf16_compute_is_finite_and_close(other_model: AnyDoorModel) -> None:
    """Reduced precision (bf16 autocast on the CPU here, fp16 on CUDA) stays close to float32, and the VAE decode
    runs in float32 so large latents cannot overflow."""
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 7, 48, generator=g)
    hint = torch.rand(1, 4, 128, 128, generator=g)
    ref = other_model.predict_noise(x, 500, ctx, hint)
    half = replace_dtype(other_model, torch.bfloat16)
    low = half.predict_noise(x, 500, ctx, hint)
    assert torch.isfinite(low).all()
    assert float((low - ref).norm() / ref.norm()) < 0.05
    decoded = half.decode_latent(torch.randn(1, 4, 16, 16, generator=g) * 40)
    assert decoded.dtype == torch.float32 and torch.isfinite(decoded).all()


def replace_dtype(model: AnyDoorModel, dtype: torch.dtype) -> AnyDoorModel:
    clone = AnyDoorModel(model.config).eval()
    clone.load_state_dict(model.state_dict())
    clone.compute_dtype = dtype
    return clone


def test_released_config_is_a_preset() -> None:
    cfg = released_config()
    assert cfg.unet.model_channels == 320 and cfg.dino.embed_dim == 1536 and cfg.dino.num_tokens == 257
    assert replace(cfg, image_size=64).hint_size == 512
