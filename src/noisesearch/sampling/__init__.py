"""Sigma schedules and stochastic samplers whose injected noise is an explicit argument."""
from noisesearch.sampling.samplers import (
    SAMPLERS,
    EulerAncestral,
    HeunChurn,
    Sampler,
    State,
    make_sampler,
)
from noisesearch.sampling.schedules import karras_sigmas

__all__ = ["karras_sigmas", "Sampler", "State", "EulerAncestral", "HeunChurn", "SAMPLERS", "make_sampler"]
