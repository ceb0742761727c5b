"""Networks of other parameterizations as sigma-parameterized denoisers (cf. k-diffusion's external.py).

noisesearch works in the EDM / k-diffusion convention ``x = x0 + sigma * eps`` with a denoiser
``D(x, sigma, cond) -> x0``. Pretrained networks use other conventions; the wrappers here convert:

* **Discrete VP, eps-prediction** (DDPM / Stable Diffusion): trained on
  ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps`` with ``a_t = alphas_cumprod[t]``, t = 0 .. T-1.
  Dividing by ``sqrt(a_t)`` gives ``x = x0 + sigma_t eps`` with ``sigma_t = sqrt((1 - a_t) / a_t)``,
  so the network sees ``x_t = c_in x`` with ``c_in = 1 / sqrt(sigma^2 + 1)`` and
  ``x0 = x - sigma * eps``.
* **Discrete VP, v-prediction** (SD 2.x 768): ``v = sqrt(a) eps - sqrt(1 - a) x0``. With
  sigma_data = 1: ``x0 = c_skip x + c_out v``, ``c_skip = 1 / (sigma^2 + 1)``,
  ``c_out = -sigma / sqrt(sigma^2 + 1)``.
* **Flow matching / rectified flow** (SD3, FLUX): ``x_t = (1 - t) x0 + t eps`` for t in [0, 1] and
  the network predicts the velocity ``v = eps - x0``. Then ``sigma = t / (1 - t)``,
  ``x_t = x / (1 + sigma)`` and ``x0 = x_t - t v``. SD3's transformer takes ``1000 t``; FLUX's
  takes ``t`` (it multiplies by 1000 itself).

A wrapped *network* is any callable ``net(x_in, t, cond) -> output`` where ``t`` has shape [B] (the
network's own time input: a possibly fractional training timestep for the VP wrappers, ``t`` times
``timestep_scale`` for flows). Every wrapper is itself a callable ``(x, sigma, cond) -> x0`` with
``sigma_min`` / ``sigma_max``; ``models.diffusers`` adds names, shapes, prompts and decoding.
"""
from __future__ import annotations

from typing import Callable

import torch

Network = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]


def _expand(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-row scalars [B] broadcastable against x [B, ...]."""
    return v.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation like ``numpy.interp`` (``xp`` increasing; clamps outside)."""
    x = x.clamp(xp[0], xp[-1])
    hi = torch.searchsorted(xp, x.contiguous(), right=False).clamp(1, len(xp) - 1)
    lo = hi - 1
    w = (x - xp[lo]) / (xp[hi] - xp[lo])
    return fp[lo] + w * (fp[hi] - fp[lo])


# ---- discrete VP schedules -----------------------------------------------------------------------


class DiscreteVPSchedule:
    """The sigmas of a discrete VP schedule and the sigma <-> training-timestep maps.

    ``sigmas[t] = sqrt((1 - a_t) / a_t)`` for the training timesteps t = 0 .. T-1 (increasing in t).
    A sigma between two training sigmas maps to a fractional timestep by interpolation:

    * ``interp="log"`` (k-diffusion, and diffusers for Karras / exponential sigma schedules):
      linear in log sigma.
    * ``interp="linear"``: linear in sigma; the exact inverse of diffusers' EulerDiscreteScheduler
      with its default ``interpolation_type="linear"``, which builds sigmas as
      ``np.interp(timesteps, arange(T), sigmas)``.

    Both agree exactly at integer timesteps. ``t_to_sigma`` uses the same rule in reverse, so the
    two maps round-trip.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, interp: str = "log"):
        if interp not in ("log", "linear"):
            raise ValueError(f"interp must be 'log' or 'linear', got {interp!r}")
        a = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        self.alphas_cumprod = a
        self.sigmas = ((1 - a) / a).sqrt()
        self.log_sigmas = self.sigmas.log()
        self.interp = interp
        self.timesteps = torch.arange(len(a), dtype=torch.float64)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional training timestep(s) of ``sigma`` (float64, clamped to [0, T-1])."""
        s = torch.as_tensor(sigma, dtype=torch.float64).cpu()
        if self.interp == "log":
            return _interp(s.clamp_min(1e-10).log(), self.log_sigmas, self.timesteps)
        return _interp(s, self.sigmas, self.timesteps)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Sigma(s) at fractional training timestep(s) ``t`` (float64)."""
        t = torch.as_tensor(t, dtype=torch.float64).cpu()
        if self.interp == "log":
            return _interp(t, self.timesteps, self.log_sigmas).exp()
        return _interp(t, self.timesteps, self.sigmas)


class VPEpsDenoiser:
    """eps-prediction network on a discrete VP schedule -> ``D(x, sigma, cond) = x - sigma * eps``."""

    prediction_type = "epsilon"

    def __init__(self, net: Network, schedule: DiscreteVPSchedule):
        self.net = net
        self.schedule = schedule

    @property
    def sigma_min(self) -> float:
        return self.schedule.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.schedule.sigma_max

    def network_inputs(self, x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, t): the VP sample ``x / sqrt(sigma^2 + 1)`` and the training timestep of ``sigma``."""
        c_in = 1 / (sigma.double() ** 2 + 1).sqrt()
        t = self.schedule.sigma_to_t(sigma).to(device=x.device, dtype=torch.float32)
        return x * _expand(c_in, x), t

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
        x_t, t = self.network_inputs(x, sigma)
        eps = self.net(x_t, t, cond)
        return self.to_x0(x, sigma, eps)

    @staticmethod
    def to_x0(x: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return x - _expand(sigma, x) * eps.to(x.dtype)


class VPVDenoiser(VPEpsDenoiser):
    """v-prediction network on a discrete VP schedule (sigma_data = 1):
    ``D = c_skip x + c_out v`` with ``c_skip = 1 / (sigma^2 + 1)``, ``c_out = -sigma / sqrt(sigma^2 + 1)``."""

    prediction_type = "v_prediction"

    @staticmethod
    def to_x0(x: torch.Tensor, sigma: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        s = sigma.double()
        c_skip = 1 / (s**2 + 1)
        c_out = -s / (s**2 + 1).sqrt()
        return _expand(c_skip, x) * x + _expand(c_out, x) * v.to(x.dtype)


def vp_denoiser(net: Network, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon", interp: str = "log"):
    """The VP wrapper for ``prediction_type`` ('epsilon' or 'v_prediction')."""
    schedule = DiscreteVPSchedule(alphas_cumprod, interp=interp)
    if prediction_type == "epsilon":
        return VPEpsDenoiser(net, schedule)
    if prediction_type in ("v_prediction", "v"):
        return VPVDenoiser(net, schedule)
    raise ValueError(f"unsupported prediction_type {prediction_type!r}; expected 'epsilon' or 'v_prediction'")


# ---- flow matching -----------------------------------------------------------------------------


def flow_t_to_sigma(t):
    """Rectified-flow time t in [0, 1) -> sigma = t / (1 - t)."""
    return t / (1 - t)


def flow_sigma_to_t(sigma):
    """sigma >= 0 -> rectified-flow time t = sigma / (1 + sigma)."""
    return sigma / (1 + sigma)


class FlowDenoiser:
    """Velocity (flow-matching) network -> sigma-parameterized denoiser.

    With ``x_t = (1 - t) x0 + t eps`` and ``v = eps - x0``: ``t = sigma / (1 + sigma)``,
    ``x_t = x / (1 + sigma)``, ``x0 = x_t - t v``. The network gets ``t * timestep_scale``: 1000 for
    diffusers' ``SD3Transformer2DModel`` (it takes ``1000 t``); 1 for ``FluxTransformer2DModel``,
    which multiplies its timestep (and guidance) input by 1000 itself (``FluxPipeline`` passes
    ``timestep / 1000``). ``models.flow`` handles the families' other conventions (reversed time,
    negated velocity). ``t_min`` / ``t_max`` give ``sigma_min`` / ``sigma_max`` (the range of
    Karras schedules).

    ``sigma = inf`` (t = 1, where flow pipelines start) is allowed: there ``x`` holds the limit of
    ``x / (1 + sigma)``, i.e. the pure noise ``x_t`` (see ``sampling.samplers``).
    """

    prediction_type = "flow"

    def __init__(self, net: Network, timestep_scale: float = 1.0, t_min: float = 1e-3, t_max: float = 0.999):
        if not 0 < t_min < t_max < 1:
            raise ValueError(f"need 0 < t_min < t_max < 1, got {t_min}, {t_max}")
        self.net = net
        self.timestep_scale = timestep_scale
        self.sigma_min = flow_t_to_sigma(t_min)
        self.sigma_max = flow_t_to_sigma(t_max)

    @staticmethod
    def flow_time(sigma: torch.Tensor) -> torch.Tensor:
        """t = sigma / (1 + sigma) in float64, 1 at sigma = inf."""
        s = sigma.double()
        inf = torch.isinf(s)
        return torch.where(inf, torch.ones_like(s), s / (1 + torch.where(inf, torch.zeros_like(s), s)))

    def network_inputs(self, x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.flow_time(sigma)
        scale = torch.where(torch.isinf(sigma.double()), torch.ones_like(t), 1 / (1 + sigma.double().nan_to_num(posinf=0.0)))
        x_t = x * _expand(scale, x)
        return x_t, (t * self.timestep_scale).to(device=x.device, dtype=torch.float32)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
        x_t, t_in = self.network_inputs(x, sigma)
        v = self.net(x_t, t_in, cond)
        t = self.flow_time(sigma)
        return x_t - _expand(t, x) * v.to(x.dtype)


__all__ = [
    "DiscreteVPSchedule",
    "VPEpsDenoiser",
    "VPVDenoiser",
    "vp_denoiser",
    "FlowDenoiser",
    "flow_t_to_sigma",
    "flow_sigma_to_t",
]
