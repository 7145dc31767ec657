"""Classifier-free guidance (Ho & Salimans 2022, arXiv 2207.12598) as one denoiser over a batch.

Each row of the batch has its own scale. When any row's scale differs from 1, both branches run in *one* forward
over ``[uncond | cond]`` (twice the batch) and each row gets ``uncond + scale * (cond - uncond)``; a row at scale 1
gets the conditional branch back (up to float rounding). Only when every row is at 1 is the unconditional branch
skipped. The pipeline and the parity tests both use :func:`guided_denoiser`, so the tests test the real path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from model.diffusion.samplers import EpsFn

# predict(x, t, context, copies): the network's noise prediction for a batch made of ``copies`` stacked copies of
# the rows (1: the rows as they are; 2: [uncond rows | cond rows]), so per-row extras (hint, control) repeat too.
Predict = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def guided_denoiser(predict: Predict, cond: torch.Tensor, uncond: torch.Tensor, scale: torch.Tensor) -> EpsFn:
    """An ``eps(x, t)`` with classifier-free guidance: ``cond``/``uncond`` (B, L, D) contexts, ``scale`` (B,)."""
    if scale.ndim != 1 or scale.shape[0] != cond.shape[0] or uncond.shape != cond.shape:
        raise ValueError(f"scale {tuple(scale.shape)}, cond {tuple(cond.shape)} and uncond {tuple(uncond.shape)} "
                         "must agree on the batch size")
    if bool((scale == 1).all()):
        def conditional(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return predict(x, t, cond, 1)

        return conditional

    context = torch.cat([uncond, cond])  # (2B, L, D)
    weight = scale.to(dtype=torch.float32).view(-1, 1, 1, 1)

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = predict(torch.cat([x, x]), torch.cat([t, t]), context, 2)  # (2B, C, h, w)
        uncond_eps, cond_eps = out.float().chunk(2)
        return uncond_eps + weight.to(out.device) * (cond_eps - uncond_eps)

    return guided
