"""DDIM and DPM-Solver++(2M) on a problem with a known answer, and the pipeline's sampler option.

With Gaussian data x0 ~ N(mu, diag(s^2)) the ideal noise prediction is analytic,
``eps(x, t) = sqrt(1 - a) (x - sqrt(a) mu) / (a s^2 + 1 - a)`` with ``a = alphas_cumprod[t]``, and so is the
probability-flow ODE that both samplers integrate: ``(x - sqrt(a) mu) / sqrt(a s^2 + 1 - a)`` stays constant along
it. Each sampler's result can therefore be compared with the exact end point.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from model.config import ScheduleConfig
from model.diffusion.samplers import DPMPP_DEFAULT_STEPS, SAMPLERS, ddim_sample, dpmpp_2m_sample
from model.diffusion.schedule import ddim_timesteps, make_schedule
from model.errors import Cancelled, InputError
from model.pipeline import AnyDoorPipeline
from tests.conftest import REFERENCE
from tests.support.spec import request

CASE_A = REFERENCE / "case_a"
AC = make_schedule(ScheduleConfig())["alphas_cumprod"]  # SD 2.1's schedule


class GaussianData:
    """x0 ~ N(mu, diag(s^2)), elementwise over a (B, C, h, w) latent; s = 0 is a point mass at mu."""

    def __init__(self, shape: tuple[int, ...], seed: int = 0, point_mass: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        self.mu = 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)
        self.var = torch.zeros(shape, dtype=torch.float64) if point_mass else (
            0.05 + 0.95 * torch.rand(shape, generator=g, dtype=torch.float64)) ** 2
        self.x_T = torch.randn(shape, generator=g).float()
        self.calls: list[list[int]] = []

    def eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls.append(t.tolist())
        a = AC.double()[t].view(-1, *([1] * (x.ndim - 1)))
        return ((1 - a).sqrt() * (x.double() - a.sqrt() * self.mu) / (a * self.var + 1 - a)).float()

    def exact(self, steps: int) -> torch.Tensor:
        """The ODE's end point from x_T taken at the first model timestep, at the noise level where the samplers
        stop (alphas_cumprod[0])."""
        a_T, a_0 = AC.double()[ddim_timesteps(steps)[-1]], AC.double()[0]
        z = (self.x_T.double() - a_T.sqrt() * self.mu) / (a_T * self.var + 1 - a_T).sqrt()
        return a_0.sqrt() * self.mu + (a_0 * self.var + 1 - a_0).sqrt() * z


def _error(sampler, steps: int, data: GaussianData | None = None) -> float:  # type: ignore[no-untyped-def]
    data = data or GaussianData((2, 4, 8, 8))
    out = sampler(data.eps, data.x_T, AC, steps)
    exact = data.exact(steps)
    return float((out.double() - exact).norm() / exact.norm())


@pytest.mark.parametrize(("sampler", "tol"), [(ddim_sample, 3e-3), (dpmpp_2m_sample, 5e-4)])
def test_converges_to_the_exact_answer(sampler, tol: float) -> None:  # type: ignore[no-untyped-def]
    # Slowly: on the uniform-in-t grid the interval ending at t=1 stays long in log-SNR until the step count
    # nears 1000, for both samplers (DDIM: 2.2e-1, 6.7e-2, 1.5e-2, 1.8e-3; DPM-Solver++: 1.6e-1 ... 2.3e-4).
    errors = [_error(sampler, steps) for steps in (5, 20, 100, 1000)]
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < tol, errors


@pytest.mark.parametrize("sampler", [ddim_sample, dpmpp_2m_sample])
def test_point_mass_is_exact_at_any_step_count(sampler) -> None:  # type: ignore[no-untyped-def]
    """The data prediction is constant for a point mass: both update rules then integrate the ODE exactly."""
    data = GaussianData((1, 4, 8, 8), point_mass=True)
    for steps in (1, 3, 10):
        assert _error(sampler, steps, data) < 1e-6


@pytest.mark.parametrize("steps", [3, 5, 10, DPMPP_DEFAULT_STEPS, 25, 50, 1000])
def test_dpmpp_is_at_least_as_accurate_as_ddim(steps: int) -> None:
    ddim, dpm = _error(ddim_sample, steps), _error(dpmpp_2m_sample, steps)
    assert dpm <= ddim, (steps, dpm, ddim)
    if steps >= 50:  # second order against first: the gap widens with the step count
        assert dpm < 0.7 * ddim, (steps, dpm, ddim)


def test_dpmpp_first_step_is_ddim() -> None:
    """With no history DPM-Solver++ takes a first-order step, which is DDIM's update."""
    data = GaussianData((2, 4, 8, 8))
    torch.testing.assert_close(dpmpp_2m_sample(data.eps, data.x_T, AC, 1), ddim_sample(data.eps, data.x_T, AC, 1))


@pytest.mark.parametrize("steps", [1, 3, 37, 50])
def test_same_timesteps_as_ddim(steps: int) -> None:
    a, b = GaussianData((2, 4, 8, 8)), GaussianData((2, 4, 8, 8))
    ddim_sample(a.eps, a.x_T, AC, steps)
    dpmpp_2m_sample(b.eps, b.x_T, AC, steps)
    assert a.calls == b.calls
    assert [c[0] for c in b.calls] == list(reversed(ddim_timesteps(steps)))
    assert all(len(set(c)) == 1 and len(c) == 2 for c in b.calls)


def test_every_timestep_is_finite() -> None:
    """steps == T ends on timestep 0 itself: the last step has zero length and must not divide by it."""
    out = dpmpp_2m_sample(GaussianData((1, 4, 4, 4)).eps, GaussianData((1, 4, 4, 4)).x_T, AC, 1000)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("steps", [0, 1001])
def test_bad_step_count(steps: int) -> None:
    data = GaussianData((1, 4, 4, 4))
    with pytest.raises(ValueError, match="steps must be between 1 and 1000"):
        dpmpp_2m_sample(data.eps, data.x_T, AC, steps)


def test_cancel_before_a_step_and_progress_after_each() -> None:
    data = GaussianData((1, 4, 4, 4))
    seen: list[tuple[int, int, int]] = []
    dpmpp_2m_sample(data.eps, data.x_T, AC, 4, progress=lambda *a: seen.append(a))
    assert seen == [(n + 1, 4, t) for n, t in enumerate(reversed(ddim_timesteps(4)))]

    data.calls.clear()
    with pytest.raises(Cancelled, match="before step 3 of 4"):
        dpmpp_2m_sample(data.eps, data.x_T, AC, 4, should_cancel=lambda: len(data.calls) >= 2)
    assert len(data.calls) == 2


def test_output_dtype_and_device_follow_the_input() -> None:
    data = GaussianData((1, 4, 4, 4))
    out = dpmpp_2m_sample(data.eps, data.x_T, AC, 3)
    assert out.dtype == torch.float32 and out.shape == data.x_T.shape


# --- the pipeline's sampler option -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe() -> AnyDoorPipeline:
    return AnyDoorPipeline.from_pretrained(CASE_A / "model.safetensors", CASE_A / "model.yaml", device="cpu")


def _generate(pipe: AnyDoorPipeline, **kwargs):  # type: ignore[no-untyped-def]
    args = dict(reference=CASE_A / "reference.png", background=CASE_A / "background.png",
                background_mask=CASE_A / "background_mask.png", steps=3, sampler="dpmpp_2m", seed=11)
    args.update(kwargs)
    return pipe(**args)


@pytest.mark.slow
def test_pipeline_dpmpp_end_to_end(pipe: AnyDoorPipeline) -> None:
    seen: list[tuple[int, int, int]] = []
    result = _generate(pipe, progress=lambda *a: seen.append(a))
    background = Image.open(CASE_A / "background.png")
    assert result.image.size == background.size and result.image.mode == "RGB"
    pixels = np.asarray(result.image)
    assert pixels.dtype == np.uint8 and pixels.std() > 0
    assert [s[:2] for s in seen] == [(1, 3), (2, 3), (3, 3)]

    again = _generate(pipe).to_png()
    assert again == result.to_png()
    assert _generate(pipe, seed=12).to_png() != again
    # The option reaches the sampler: DDIM from the same noise gives another image.
    assert _generate(pipe, sampler="ddim").to_png() != again
    assert Image.open(io.BytesIO(again)).size == background.size


def test_pipeline_default_sampler_is_ddim(pipe: AnyDoorPipeline) -> None:
    assert tuple(SAMPLERS) == ("ddim", "dpmpp_2m")
    default = pipe(CASE_A / "reference.png", CASE_A / "background.png",
                   background_mask=CASE_A / "background_mask.png", steps=2, seed=5)
    assert default.to_png() == _generate(pipe, sampler="ddim", steps=2, seed=5).to_png()
    job = pipe.prepare(*request(CASE_A / "reference.png", CASE_A / "background.png",
                       background_mask=CASE_A / "background_mask.png", steps=2))
    assert job.params.sampler == "ddim"


@pytest.mark.parametrize("bad", ["euler", "DDIM", "", 3])
def test_pipeline_rejects_unknown_sampler(pipe: AnyDoorPipeline, bad: object) -> None:
    with pytest.raises(InputError) as info:
        _generate(pipe, sampler=bad)
    assert info.value.field == "sampler" and info.value.code == "invalid_parameter"
    assert "ddim" in info.value.message and "dpmpp_2m" in info.value.message


def test_run_jobs_needs_one_sampler(pipe: AnyDoorPipeline) -> None:
    jobs = [pipe.prepare(*request(CASE_A / "reference.png", CASE_A / "background.png",
                         background_mask=CASE_A / "background_mask.png", steps=2, sampler=name, seed=1))
            for name in SAMPLERS]
    with pytest.raises(ValueError, match="share the step count and sampler"):
        pipe.run(jobs)
