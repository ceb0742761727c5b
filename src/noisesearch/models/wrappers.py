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

**Bring your own network.** ``network_denoiser(net, prediction, process, sample_shape)`` makes a
full Denoiser (names, shapes, FLOPs, encode / decode) from any ``net(x_t, t)`` and a declaration of
what it predicts (``PREDICTIONS``: eps, x0, score, v, edm, velocity) under which noise process
(``DiscreteVP`` from alphas_cumprod, ``VPSDE`` from a beta schedule or ``int_beta``, ``VE``, ``EDM``
preconditioning, ``RectifiedFlow``). See docs/byo.md.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from noisesearch.errors import NoiseSearchError
from noisesearch.flops import count_flops

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


# ---- any network + a declared parametrisation -> a full Denoiser ---------------------------------
#
# A noise process puts the EDM state ``x = x0 + sigma * eps`` into the network's own frame:
# ``x_t = alpha(sigma) * x = alpha x0 + std eps`` with ``std = alpha * sigma``, and gives the
# network's time input for ``sigma``. A prediction type turns the network's output back into x0
# (``prediction_to_x0``). ``network_denoiser`` joins the two into a Denoiser.


def _f64(sigma) -> torch.Tensor:
    return torch.as_tensor(sigma, dtype=torch.float64).cpu()


def _rows(sigma, n: int) -> torch.Tensor:
    """sigma (a scalar or [B]) as float64 [n] on the CPU."""
    return _f64(sigma).reshape(-1).expand(n)


def _noise_input(kind, sigma: torch.Tensor) -> torch.Tensor:
    """The time input of VE / EDM networks: ``sigma``, ``log_sigma``, ``edm`` (ln(sigma) / 4) or a callable."""
    if callable(kind):
        return _f64(kind(sigma))
    if kind == "sigma":
        return sigma
    if kind == "log_sigma":
        return sigma.clamp_min(1e-20).log()
    if kind == "edm":
        return sigma.clamp_min(1e-20).log() / 4
    raise NoiseSearchError(f"noise_input must be 'sigma', 'log_sigma', 'edm' or a callable, got {kind!r}")


class NoiseProcess:
    """Base of the noise processes: ``alpha(sigma)`` (network frame scale), ``time(sigma)`` (the
    network's time input), ``sigma_min`` / ``sigma_max`` and ``sigma_data`` (for v / EDM outputs)."""

    name = "process"
    sigma_data = 1.0
    sigma_min: float
    sigma_max: float

    def alpha(self, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def time(self, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


class DiscreteVP(NoiseProcess):
    """Discrete VP (DDPM / Stable Diffusion) from ``alphas_cumprod``: ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps``,
    ``sigma_t = sqrt((1 - a_t) / a_t)``, ``alpha = 1 / sqrt(sigma^2 + 1)``; the time input is the
    (fractional) training timestep (``DiscreteVPSchedule``, k-diffusion's ``DiscreteSchedule``)."""

    name = "discrete-vp"

    def __init__(self, alphas_cumprod, interp: str = "log"):
        self.schedule = DiscreteVPSchedule(alphas_cumprod, interp=interp)
        self.sigma_min, self.sigma_max = self.schedule.sigma_min, self.schedule.sigma_max

    def alpha(self, sigma):
        return 1 / (_f64(sigma) ** 2 + 1).sqrt()

    def time(self, sigma):
        return self.schedule.sigma_to_t(sigma)


class VPSDE(NoiseProcess):
    """Continuous VP-SDE (Song et al. 2021) with ``int_beta(t) = integral_0^t beta``:
    ``x_t = exp(-B/2) x0 + sqrt(1 - exp(-B)) eps``, so ``sigma = sqrt(exp(B(t)) - 1)`` and
    ``alpha = exp(-B/2) = 1 / sqrt(sigma^2 + 1)``.

    Default: the linear schedule ``beta(t) = beta_min + t (beta_max - beta_min)`` on t in [t_min, 1].
    ``int_beta`` (a callable on float64 tensors, increasing, 0 at 0) replaces it, e.g. ``lambda t: t``
    with ``t_max=10`` (galaxygrad); its inverse is ``inverse_int_beta`` when given, else found by
    bisection. The network gets ``t * time_scale`` (999 for score_sde's DDPM++ checkpoints)."""

    name = "vp-sde"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, int_beta: Callable | None = None,
                 inverse_int_beta: Callable | None = None, t_min: float = 1e-3, t_max: float = 1.0, time_scale: float = 1.0):
        if not 0 < t_min < t_max:
            raise NoiseSearchError(f"VPSDE needs 0 < t_min < t_max, got t_min={t_min}, t_max={t_max}")
        if int_beta is None and not 0 < beta_min <= beta_max:
            raise NoiseSearchError(f"VPSDE needs 0 < beta_min <= beta_max, got {beta_min}, {beta_max}")
        self.beta_min, self.beta_max, self.custom = float(beta_min), float(beta_max), int_beta is not None
        self._int_beta, self._inverse = int_beta, inverse_int_beta
        self.t_min, self.t_max, self.time_scale = float(t_min), float(t_max), float(time_scale)
        self.sigma_min = float(self.t_to_sigma(torch.tensor([t_min]))[0])
        self.sigma_max = float(self.t_to_sigma(torch.tensor([t_max]))[0])
        if not 0 < self.sigma_min < self.sigma_max:
            raise NoiseSearchError("VPSDE: int_beta must increase from 0 (sigma(t_min) < sigma(t_max))")

    def int_beta(self, t: torch.Tensor) -> torch.Tensor:
        t = _f64(t)
        if self._int_beta is not None:
            return _f64(self._int_beta(t))
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def t_to_sigma(self, t) -> torch.Tensor:
        return torch.expm1(self.int_beta(t)).sqrt()

    def sigma_to_t(self, sigma) -> torch.Tensor:
        big_b = torch.log1p(_f64(sigma) ** 2)
        if self._inverse is not None:
            return _f64(self._inverse(big_b))
        if self._int_beta is None:
            d = self.beta_max - self.beta_min
            return big_b / self.beta_min if d == 0 else (-self.beta_min + (self.beta_min**2 + 2 * d * big_b).sqrt()) / d
        return self._bisect(big_b)

    def _bisect(self, big_b: torch.Tensor) -> torch.Tensor:
        lo, hi = torch.zeros_like(big_b), torch.full_like(big_b, self.t_max)
        for _ in range(64):  # widen until int_beta(hi) >= B (sigmas above sigma_max)
            short = self.int_beta(hi) < big_b
            if not short.any():
                break
            hi = torch.where(short, hi * 2, hi)
        for _ in range(80):
            mid = (lo + hi) / 2
            below = self.int_beta(mid) < big_b
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return (lo + hi) / 2

    def alpha(self, sigma):
        return 1 / (_f64(sigma) ** 2 + 1).sqrt()

    def time(self, sigma):
        return self.sigma_to_t(sigma) * self.time_scale

    def describe(self):
        sched = "custom int_beta" if self.custom else f"beta {self.beta_min:g}..{self.beta_max:g}"
        return f"vp-sde({sched}, t {self.t_min:g}..{self.t_max:g})"


class VE(NoiseProcess):
    """Variance exploding (NCSN / score_sde VE): ``x_t = x0 + sigma eps``, alpha = 1; the network's
    noise input is ``noise_input`` of sigma ('sigma', 'log_sigma', 'edm' or a callable)."""

    name = "ve"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, noise_input="sigma"):
        if not 0 < sigma_min < sigma_max:
            raise NoiseSearchError(f"VE needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max, self.noise_input = float(sigma_min), float(sigma_max), noise_input
        _noise_input(noise_input, torch.ones(1, dtype=torch.float64))  # refuse a bad kind now

    def alpha(self, sigma):
        return torch.ones_like(_f64(sigma))

    def time(self, sigma):
        return _noise_input(self.noise_input, _f64(sigma))


class EDM(VE):
    """EDM preconditioning (Karras et al. 2022): the network sees ``c_in x`` with
    ``c_in = 1 / sqrt(sigma^2 + sigma_data^2)`` and ``c_noise = ln(sigma) / 4``; its raw output F
    (prediction ``"edm"``) gives ``x0 = c_skip x + c_out F``."""

    name = "edm"

    def __init__(self, sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0, noise_input="edm"):
        super().__init__(sigma_min, sigma_max, noise_input)
        if not sigma_data > 0:
            raise NoiseSearchError(f"EDM needs sigma_data > 0, got {sigma_data}")
        self.sigma_data = float(sigma_data)

    def alpha(self, sigma):
        return 1 / (_f64(sigma) ** 2 + self.sigma_data**2).sqrt()

    def describe(self):
        return f"edm(sigma_data={self.sigma_data:g})"


class RectifiedFlow(NoiseProcess):
    """Rectified flow / flow matching: ``x_t = (1 - t) x0 + t eps``, ``sigma = t / (1 - t)``,
    ``alpha = 1 / (1 + sigma)``; the network gets ``t * time_scale`` (see ``FlowDenoiser``)."""

    name = "rectified-flow"

    def __init__(self, t_min: float = 1e-3, t_max: float = 0.999, time_scale: float = 1.0):
        if not 0 < t_min < t_max < 1:
            raise NoiseSearchError(f"RectifiedFlow needs 0 < t_min < t_max < 1, got {t_min}, {t_max}")
        self.sigma_min, self.sigma_max = flow_t_to_sigma(t_min), flow_t_to_sigma(t_max)
        self.time_scale = float(time_scale)

    def alpha(self, sigma):
        return 1 / (1 + _f64(sigma))

    def time(self, sigma):
        return flow_sigma_to_t(_f64(sigma)) * self.time_scale


PREDICTIONS = {
    "eps": "the added noise eps",
    "x0": "the clean sample x0",
    "score": "the score grad log p(x_t) in the network's frame",
    "v": "v = alpha eps - std x0 (k-diffusion's VDenoiser target, with the process's sigma_data)",
    "edm": "EDM's raw output F, x0 = c_skip x + c_out F",
    "velocity": "the flow velocity eps - x0 (rectified flow only)",
}
_ALIASES = {"epsilon": "eps", "noise": "eps", "sample": "x0", "v_prediction": "v", "F": "edm", "flow": "velocity"}


def prediction_to_x0(prediction: str, out: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor,
                     process: NoiseProcess) -> torch.Tensor:
    """x0 from the network output ``out`` of type ``prediction`` at the EDM state ``x`` (float64 maths).

    With ``x_t = alpha x`` and ``std = alpha sigma``: eps gives ``x - sigma eps``; score (``= -eps / std``)
    gives ``x + alpha sigma^2 score``; v and edm give ``c_skip x + c_out out`` with
    ``c_skip = sd^2 / (sigma^2 + sd^2)``, ``c_out = -/+ sigma sd / sqrt(sigma^2 + sd^2)``; velocity
    (``eps - x0``, rectified flow) gives ``x_t - t v``."""
    s = _f64(sigma).to(x.device)
    out = out.to(x.dtype)
    if prediction == "x0":
        return out
    if prediction == "eps":
        return x - _expand(s, x) * out
    if prediction == "score":
        return x + _expand(process.alpha(s).to(x.device) * s**2, x) * out
    if prediction in ("v", "edm"):
        sd = process.sigma_data
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / (s**2 + sd**2).sqrt() * (-1 if prediction == "v" else 1)
        return _expand(c_skip, x) * x + _expand(c_out, x) * out
    if prediction == "velocity":
        t = flow_sigma_to_t(s)
        return _expand(1 - t, x) * x - _expand(t, x) * out  # x_t - t v with x_t = (1 - t) x
    raise NoiseSearchError(f"unknown prediction {prediction!r}; valid predictions: {', '.join(PREDICTIONS)}")


def _check_prediction(prediction: str, process: NoiseProcess) -> str:
    kind = _ALIASES.get(prediction, prediction)
    if kind not in PREDICTIONS:
        raise NoiseSearchError(f"unknown prediction {prediction!r}; valid predictions: {', '.join(PREDICTIONS)}")
    if kind == "velocity" and not isinstance(process, RectifiedFlow):
        raise NoiseSearchError("prediction 'velocity' (eps - x0) needs process=RectifiedFlow(...); "
                               "for VP / EDM networks use 'eps', 'v', 'x0' or 'score'")
    if not isinstance(process, NoiseProcess):
        raise NoiseSearchError(f"process must be a noise process (DiscreteVP, VPSDE, VE, EDM, RectifiedFlow), "
                               f"got {type(process).__name__}")
    return kind


def _net_placement(net) -> tuple[torch.device, torch.dtype]:
    params = list(net.parameters()) if isinstance(net, torch.nn.Module) else []
    if params:
        return params[0].device, params[0].dtype
    return torch.device("cpu"), torch.float32


def unit_range_decode(x0: torch.Tensor) -> torch.Tensor:
    """Data in [-1, 1] -> images in [0, 1] (the default decode)."""
    return ((x0.float() + 1) / 2).clamp(0, 1)


class NetworkDenoiser:
    """A network and its declared parametrisation as a Denoiser (see :func:`network_denoiser`)."""

    family = "network"
    flops_per_decode = 0.0
    guidance = 1.0

    def __init__(self, net, prediction: str, process: NoiseProcess, sample_shape, *, name: str | None = None,
                 conditional: bool = False, encode: Callable | None = None, decode: Callable | None = None,
                 default_steps: int = 32, flops_per_call: float | None = None, flops_prompt: str = ""):
        self.prediction = _check_prediction(prediction, process)
        if conditional and encode is None:
            raise NoiseSearchError("a conditional network needs encode=f(prompts) -> batched condition")
        self.net, self.process, self.conditional = net, process, bool(conditional)
        self.sample_shape = tuple(int(n) for n in sample_shape)
        self.name = name or type(net).__name__
        self.parametrisation = f"{self.prediction} / {process.describe()}"
        self.sigma_min, self.sigma_max = float(process.sigma_min), float(process.sigma_max)
        self.default_steps = int(default_steps)
        self.device, self.dtype = _net_placement(net)
        self._encode, self._decode = encode, decode or unit_range_decode
        self.flops_per_call = float(flops_per_call) if flops_per_call is not None else self._count_flops(flops_prompt)

    def _count_flops(self, prompt: str) -> float:
        x = torch.zeros(1, *self.sample_shape, device=self.device, dtype=self.dtype)
        sigma = torch.ones(1, dtype=torch.float64)
        cond = self.encode([prompt]) if self.conditional else None
        return count_flops(lambda: self(x, sigma, cond))

    def encode(self, prompts: Sequence[str]):
        """The condition of ``prompts``; an unconditional network takes any prompts (a placeholder row each)."""
        if self.conditional:
            return self._encode(list(prompts))
        return torch.zeros(len(prompts), device=self.device)

    def network_inputs(self, x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, t_in): the network's frame ``alpha(sigma) x`` and its time input, shape [B]."""
        s = _rows(sigma, x.shape[0])
        x_t = x * _expand(self.process.alpha(s).to(x.device), x)
        return x_t.to(self.dtype), self.process.time(s).to(device=x.device, dtype=self.dtype)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
        x_t, t_in = self.network_inputs(x, sigma)
        out = self.net(x_t, t_in, cond) if self.conditional else self.net(x_t, t_in)
        return prediction_to_x0(self.prediction, out, x, _rows(sigma, x.shape[0]), self.process)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return self._decode(x0)


def network_denoiser(net, prediction: str, process: NoiseProcess, sample_shape, **options) -> NetworkDenoiser:
    """A Denoiser from a network and what it predicts under which noise process.

    ``net(x_t, t)`` (or ``net(x_t, t, cond)`` when ``conditional=True``) takes the sample in its own
    frame and its time input [B]; ``prediction`` is one of ``PREDICTIONS`` ('eps', 'x0', 'score', 'v',
    'edm', 'velocity'); ``process`` one of ``DiscreteVP``, ``VPSDE``, ``VE``, ``EDM``, ``RectifiedFlow``.
    Options: ``name``, ``conditional`` (default False), ``encode`` (prompts -> condition, needed when
    conditional), ``decode`` (x0 -> images in [0, 1]; default ``(x0 + 1) / 2``), ``default_steps``,
    ``flops_per_call`` (default: counted on one sample with ``noisesearch.flops.count_flops``, a
    conditional network with the condition of ``flops_prompt``, default "")."""
    return NetworkDenoiser(net, prediction, process, sample_shape, **options)


__all__ = [
    "DiscreteVPSchedule",
    "VPEpsDenoiser",
    "VPVDenoiser",
    "vp_denoiser",
    "FlowDenoiser",
    "flow_t_to_sigma",
    "flow_sigma_to_t",
    "NoiseProcess",
    "DiscreteVP",
    "VPSDE",
    "VE",
    "EDM",
    "RectifiedFlow",
    "PREDICTIONS",
    "prediction_to_x0",
    "unit_range_decode",
    "NetworkDenoiser",
    "network_denoiser",
]
