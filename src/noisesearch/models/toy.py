"""A toy denoiser with an exact Tweedie estimate: data is a mixture of point masses.

For data x0 in {mu_1, ..., mu_K} with weights w_k, ``E[x0 | x0 + sigma * eps = x]`` is the softmax
of ``log w_k - |x - mu_k|^2 / (2 sigma^2)`` over the points. No training, no weights: used by tests
and examples where the right answer is known (e.g. a reward that prefers one mode).
"""
from __future__ import annotations

from typing import Sequence

import torch

from noisesearch.errors import NoiseSearchError


class PointMixtureDenoiser:
    name = "toy"
    sigma_min = 0.002
    sigma_max = 20.0
    default_steps = 12
    dtype = torch.float32
    device = torch.device("cpu")

    def __init__(self, points: torch.Tensor, weights: torch.Tensor | None = None, flops_per_call: float = 1.0,
                 flops_per_decode: float = 0.0):
        self.points = points.float()  # [K, *sample_shape]
        k = points.shape[0]
        w = torch.full((k,), 1.0 / k) if weights is None else weights.float() / weights.sum()
        self.log_w = w.log()
        self.sample_shape = tuple(points.shape[1:])
        self.flops_per_call = flops_per_call
        self.flops_per_decode = flops_per_decode  # > 0 plays a latent model (decoding costs)
        self.calls = 0  # network evaluations, for tests

    def encode(self, prompts: Sequence[str]):
        for p in prompts:
            if not str(p).strip().lstrip("-").isdigit():
                raise NoiseSearchError(f"the toy model takes integer prompts, got {p!r}")
        return torch.tensor([int(p) for p in prompts])

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond) -> torch.Tensor:
        self.calls += x.shape[0]
        flat_x = x.flatten(1)  # [B, D]
        mu = self.points.flatten(1)  # [K, D]
        d2 = torch.cdist(flat_x, mu) ** 2  # [B, K]
        logits = self.log_w - d2 / (2 * sigma.view(-1, 1) ** 2)
        return (logits.softmax(-1) @ mu).view_as(x)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return ((x0 + 1) / 2).clamp(0, 1)
