"""The samplers, DDIM and DPM-Solver++(2M), and the registry the request spec draws its ``sampler`` choices from.

DDIM follows Song et al., "Denoising Diffusion Implicit Models" (arXiv 2010.02502), eq. 12; DPM-Solver++(2M) follows
Lu et al. 2022 (arXiv 2211.01095), Algorithm 2. Each sampler is a plain function over a denoiser
``eps(x, t) -> noise``: it never knows which network (or guidance) it drives.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from model.diffusion.schedule import ddim_timesteps
from model.errors import Cancelled
from model.spec.params import SAMPLER_DESCRIPTIONS

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# after_step(x, step_index, alpha_cumprod_reached) -> x: may rewrite the latent after each step (re-imposing known
# latents); ``alpha_cumprod_reached`` is the noise level (alpha-bar) the step landed on.
AfterStepFn = Callable[[torch.Tensor, int, float], torch.Tensor]
# progress(step_index, total_steps, timestep); called after each step.
ProgressFn = Callable[[int, int, int], None]


@torch.no_grad()
def ddim_sample(
    eps: EpsFn,
    x_T: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    steps: int,
    *,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    progress: ProgressFn | None = None,
    should_cancel: Callable[[], bool] | None = None,
    after_step: AfterStepFn | None = None,
    first_step: int = 0,
) -> torch.Tensor:
    """Run DDIM from ``x_T`` (B, C, h, w) down to a clean latent.

    ``alphas_cumprod`` is the model's (T,) schedule buffer. ``generator`` drives the extra noise when eta > 0.
    ``should_cancel`` is checked before every step and raises :class:`Cancelled`; ``progress`` is called after
    each; ``after_step`` may rewrite the latent after each. ``first_step`` > 0 starts part-way down the schedule
    (SDEdit): ``x_T`` is then a latent noised to the timestep of that step, and the steps before it are skipped.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    ts = ddim_timesteps(steps, alphas_cumprod.shape[0])
    ac = alphas_cumprod.detach().to(device=x_T.device, dtype=torch.float32)
    a = ac[ts]  # (S,)
    # Upstream's "previous" alpha of the first DDIM step is alphas_cumprod[0], not 1.
    a_prev = torch.cat([ac[:1], ac[ts[:-1]]])
    sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()

    x = x_T.float()
    batch = x.shape[0]
    for n, i in enumerate(reversed(range(steps))):
        if n < first_step:
            continue
        if should_cancel is not None and should_cancel():
            raise Cancelled(f"cancelled before step {n + 1} of {steps}")
        t = torch.full((batch,), ts[i], device=x.device, dtype=torch.long)
        e = eps(x, t).float()
        # 1. predicted x_0 (eq. 12, "predicted x0" term)
        pred_x0 = (x - (1 - a[i]).sqrt() * e) / a[i].sqrt()
        # 2. direction pointing to x_t (eq. 12, middle term)
        dir_xt = (1 - a_prev[i] - sigma[i] ** 2).sqrt() * e
        # 3. x_{t-1}, plus fresh noise when eta > 0 (eq. 12, last term)
        x = a_prev[i].sqrt() * pred_x0 + dir_xt
        if eta > 0:
            noise = torch.randn(x.shape, generator=generator, device=generator.device if generator else x.device)
            x = x + sigma[i] * noise.to(x.device)
        if after_step is not None:
            x = after_step(x, n, float(a_prev[i]))
        if progress is not None:
            progress(n + 1 - first_step, steps - first_step, ts[i])
    return x


# The step count where DPM-Solver++(2M) matches 50 DDIM steps for guided latent diffusion, per Lu et al. 2022
# (abstract: "15 to 20 steps for guided sampling") and common practice (diffusers, k-diffusion: 20-25).
DPMPP_DEFAULT_STEPS = 20


@torch.no_grad()
def dpmpp_2m_sample(
    eps: EpsFn,
    x_T: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    steps: int,
    *,
    progress: ProgressFn | None = None,
    should_cancel: Callable[[], bool] | None = None,
    after_step: AfterStepFn | None = None,
    first_step: int = 0,
) -> torch.Tensor:
    """Run DPM-Solver++(2M) from ``x_T`` (B, C, h, w) down to a clean latent.

    Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models" (arXiv 2211.01095),
    Algorithm 2: the multistep second-order solver of the diffusion ODE in its data-prediction form, in
    ``lambda = log(alpha / sigma)``. Each step costs one ``eps`` call, as DDIM's does, on the same timesteps
    (:func:`ddim_timesteps`) and towards the same end point (the noise level of ``alphas_cumprod[0]``, where
    DDIM's last step lands), so only the update rule differs. The first step has no history and is first order,
    which is exactly DDIM; with ``steps == 1`` the two samplers agree. ``should_cancel`` is checked before every
    step and raises :class:`Cancelled`; ``progress`` is called after each; ``after_step`` and ``first_step`` as
    for :func:`ddim_sample` (a part-way start has no history, so its first step is first order).
    """
    ts = ddim_timesteps(steps, alphas_cumprod.shape[0])
    ac = alphas_cumprod.detach().double().cpu()
    # Noise levels from the noisiest model timestep down to the end point; coefficients in float64 on the host.
    levels = [float(ac[t]) for t in reversed(ts)] + [float(ac[0])]
    alpha = [math.sqrt(a) for a in levels]
    sigma = [math.sqrt(1.0 - a) for a in levels]
    lam = [math.log(a) - math.log(s) for a, s in zip(alpha, sigma, strict=True)]

    x = x_T.float()
    batch = x.shape[0]
    x0_prev: torch.Tensor | None = None
    h_prev = 0.0
    for n in range(first_step, steps):
        if should_cancel is not None and should_cancel():
            raise Cancelled(f"cancelled before step {n + 1} of {steps}")
        t_n = ts[steps - 1 - n]
        t = torch.full((batch,), t_n, device=x.device, dtype=torch.long)
        e = eps(x, t).float()
        # 1. data prediction x_theta(x_t, t) = (x_t - sigma_t * eps) / alpha_t (sec. 3.1)
        x0 = (x - sigma[n] * e) / alpha[n]
        # 2. step size in lambda; zero only where the last model timestep is the end point itself (steps == T)
        h = lam[n + 1] - lam[n]
        if x0_prev is None:
            d = x0
        else:
            # 3. second-order multistep correction, D = (1 + 1/(2r)) x0_n - 1/(2r) x0_{n-1} with r = h_prev / h
            # (Alg. 2, line 7); written with h / (2 h_prev) so that h == 0 needs no special case
            k = h / (2.0 * h_prev)
            d = (1.0 + k) * x0 - k * x0_prev
        # 4. x_{t_{n+1}} = sigma_{n+1} / sigma_n * x_{t_n} - alpha_{n+1} (e^{-h} - 1) D (Alg. 2, line 8)
        x = (sigma[n + 1] / sigma[n]) * x - (alpha[n + 1] * math.expm1(-h)) * d
        x0_prev, h_prev = x0, h
        if after_step is not None:
            x = after_step(x, n, levels[n + 1])
        if progress is not None:
            progress(n + 1 - first_step, steps - first_step, t_n)
    return x


class Sampler(Protocol):
    def __call__(self, eps: EpsFn, x_T: torch.Tensor, alphas_cumprod: torch.Tensor, steps: int, *,
                 progress: ProgressFn | None = None, should_cancel: Callable[[], bool] | None = None,
                 after_step: AfterStepFn | None = None, first_step: int = 0) -> torch.Tensor: ...


@dataclass(frozen=True)
class SamplerInfo:
    """One entry of :data:`SAMPLERS`: the function, what it is, and the step count it is good at."""

    sample: Sampler
    description: str
    suggested_steps: int


# The registry: one function for each of the request spec's ``sampler`` choices (SAMPLER_DESCRIPTIONS), in order.
SAMPLERS: dict[str, SamplerInfo] = {
    "ddim": SamplerInfo(ddim_sample, SAMPLER_DESCRIPTIONS["ddim"], 50),
    "dpmpp_2m": SamplerInfo(dpmpp_2m_sample, SAMPLER_DESCRIPTIONS["dpmpp_2m"], DPMPP_DEFAULT_STEPS),
}
