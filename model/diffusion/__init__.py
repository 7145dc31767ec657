"""Diffusion without networks: the DDPM schedule, the samplers (plain functions over an ``eps(x, t)`` callable)
and classifier-free guidance."""
