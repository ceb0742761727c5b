"""Sigma schedules (EDM / k-diffusion convention: decreasing, ending with 0)."""
from __future__ import annotations

import math

import torch


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) eq. 5: ``n`` noise levels from sigma_max down to sigma_min, then 0.

    Returns a float64 tensor of length ``n + 1``.
    """
    if n < 1:
        raise ValueError("need at least one sampling step")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (max_inv + ramp * (min_inv - max_inv)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def vp_sigmas(n: int, sigma_first: float, beta_min: float = 0.1, beta_max: float = 20.0) -> torch.Tensor:
    """The variance-preserving (VP-SDE) interpolant's noise levels at ``n`` uniform times, then 0.

    ``x_s = alpha_s x0 + sigma_s eps`` with ``alpha_s^2 = exp(-(beta_min s + (beta_max - beta_min) s^2 / 2))``
    (Song et al. 2021's linear beta) and ``alpha_s^2 + sigma_s^2 = 1``; in the EDM convention the level is
    ``sigma_s / alpha_s``. The times are uniform from ``s_max`` down to ``s_max / n``, where ``s_max`` is
    the time of ``sigma_first`` (the model's own first level; ``inf``, a flow pipeline's start, keeps
    ``inf`` first and ``s_max = 1``). Float64, length ``n + 1``.
    """
    if n < 1:
        raise ValueError("need at least one sampling step")
    d = beta_max - beta_min
    if math.isfinite(sigma_first):
        s_max = (-beta_min + math.sqrt(beta_min**2 + 2 * d * math.log1p(sigma_first**2))) / d
    else:
        s_max = 1.0
    s = torch.linspace(s_max, s_max / n, n, dtype=torch.float64)
    sigmas = torch.sqrt(torch.expm1(beta_min * s + 0.5 * d * s**2))
    sigmas[0] = sigma_first
    return torch.cat([sigmas, sigmas.new_zeros(1)])
