"""The DDPM noise schedule (Ho et al. 2020) of Stable Diffusion 2.1 and the DDIM timestep spacing.

Built apart from the samplers, which take the schedule and the timesteps as arguments: a new spacing touches one
function here.
"""

from __future__ import annotations

import numpy as np
import torch

from model.config import ScheduleConfig


def make_schedule(cfg: ScheduleConfig) -> dict[str, torch.Tensor]:
    """The DDPM buffers stored in the checkpoint, computed in float64 and kept as float32 like upstream's."""
    betas = np.linspace(cfg.linear_start**0.5, cfg.linear_end**0.5, cfg.timesteps, dtype=np.float64) ** 2
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    values = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": np.sqrt(ac),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
        "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": np.log(np.maximum(post_var, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
        "logvar": np.zeros(cfg.timesteps),
    }
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in values.items()}


def ddim_timesteps(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """Exactly ``steps`` ascending timesteps, evenly spread over the training schedule.

    Upstream uses ``range(0, T, T // steps) + 1``: right when ``steps`` divides T, but more steps than asked
    otherwise, and past the end of the schedule for 3, 9, 27, 37 steps. ``floor(i * T / steps) + 1`` is the same
    list where ``steps`` divides T and exactly ``steps`` distinct values in ``[1, T - 1]`` for any other count
    below T. For ``steps == T`` every timestep ``0 .. T-1`` is used.
    """
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be between 1 and {num_train_timesteps}, got {steps}")
    offset = 0 if steps == num_train_timesteps else 1
    return [i * num_train_timesteps // steps + offset for i in range(steps)]
