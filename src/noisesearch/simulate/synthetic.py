"""Synthetic reward pools for tests, examples and robustness checks.

Each candidate has a latent final quality ``q`` (its final reward, up to scale and offset). Its
Tweedie estimate at step ``s`` scores ``rho_s * q + sqrt(1 - rho_s^2) * noise`` with a correlation
``rho_s`` that grows along the trajectory (to 1 at the last step); the noise-aware variant reads the
noisy estimates better (higher ``rho_s``) and may be missing (NaN) at some steps, as in the
published pools.
"""
from __future__ import annotations

import numpy as np

from noisesearch.pools import Pool


def make_synthetic_pool(num_prompts: int = 32, num_candidates: int = 64, num_steps: int = 20,
                        rewards=("r1",), seed: int = 0, scale: float = 1.0, offset: float = 0.0,
                        noise_aware: bool = True, na_missing_from: float | None = 0.75,
                        informativeness: float = 1.0, quantize: float | None = None,
                        flops_per_step: float = 9.9e12, flops_per_reward: float = 1.2e12,
                        model: str = "synthetic") -> Pool:
    """A pool of ``rewards`` (correlated with each other) with informative early steps.

    ``informativeness`` scales how early the estimates become predictive (larger = earlier);
    ``na_missing_from`` is the trajectory fraction from which noise-aware scores are NaN (None: no
    NaN); ``quantize`` rounds rewards to that step (creates ties).
    """
    rng = np.random.default_rng(seed)
    P, N, S = num_prompts, num_candidates, num_steps
    t = np.arange(S) / max(S - 1, 1)
    rho_base = np.clip(t ** (1.5 / informativeness), 0, 1)
    rho_na = np.clip(np.sqrt(rho_base) * 0.97, 0, 1)
    rho_base[-1] = 1.0
    shared = rng.normal(size=(P, N))
    prompt_level = rng.normal(scale=0.5, size=(P, 1))
    out, out_na = {}, {}
    for j, name in enumerate(rewards):
        q = 0.7 * shared + np.sqrt(1 - 0.7**2) * rng.normal(size=(P, N))  # rewards correlate
        noise = rng.normal(size=(P, N, S))
        base = rho_base * q[..., None] + np.sqrt(1 - rho_base**2) * noise
        na = rho_na * q[..., None] + np.sqrt(1 - rho_na**2) * rng.normal(size=(P, N, S))
        base = (base + prompt_level[..., None]) * scale * (1 + 0.5 * j) + offset + j
        na = (na + prompt_level[..., None]) * scale * (1 + 0.5 * j) + offset + j
        if quantize:
            base = np.round(base / quantize) * quantize
            na = np.round(na / quantize) * quantize
        if na_missing_from is not None:
            na[:, :, t >= na_missing_from] = np.nan
        out[name] = base.astype(np.float32)
        out_na[name] = na.astype(np.float32)
    return Pool(
        rewards=out,
        noise_aware=out_na if noise_aware else {},
        prompts=[f"synthetic prompt {i}" for i in range(P)],
        model=model,
        flops_per_step=flops_per_step,
        flops_per_reward={name: flops_per_reward for name in rewards},
        extra={"source": "noisesearch.simulate.synthetic", "seed": seed},
    )
