"""Parameterization wrappers against closed-form oracles.

Data: x0 ~ N(mu, s^2 I). For x = x0 + sigma * eps the exact denoiser is
``E[x0 | x] = mu + s^2 / (s^2 + sigma^2) (x - mu)``. Each oracle network computes the exact
eps / v / velocity *in its own parameterization* (VP x_t at a training timestep, or flow x_t at
time t), and the wrapped network must return the exact x0 above.
"""
import math

import numpy as np
import pytest
import torch

from noisesearch.models.wrappers import (
    DiscreteVPSchedule,
    FlowDenoiser,
    VPEpsDenoiser,
    VPVDenoiser,
    flow_sigma_to_t,
    flow_t_to_sigma,
    vp_denoiser,
)

torch.manual_seed(0)
MU = torch.randn(1, 2, 3, 3, dtype=torch.float64)
S = 0.7  # data std (S = 0 is a single point)
ALPHAS_CUMPROD = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0)


def exact_x0(x, sigma, s=S):
    w = s**2 / (s**2 + sigma.view(-1, 1, 1, 1) ** 2)
    return MU + w * (x - MU)


def vp_oracle(kind, s=S):
    """Exact eps or v of VP data at integer training timesteps (asserts the timestep is integral)."""

    def net(x_t, t, cond):
        assert torch.allclose(t, t.round(), atol=1e-3), t
        a = ALPHAS_CUMPROD[t.round().long()].view(-1, 1, 1, 1)
        x_t = x_t.double()
        var = a * s**2 + 1 - a  # Var[x_t]
        resid = x_t - a.sqrt() * MU
        eps = (1 - a).sqrt() * resid / var
        x0 = MU + a.sqrt() * s**2 * resid / var
        return eps if kind == "eps" else a.sqrt() * eps - (1 - a).sqrt() * x0

    return net


@pytest.mark.parametrize("kind", ["eps", "v"])
@pytest.mark.parametrize("s", [S, 0.0])
def test_vp_wrappers_return_exact_x0(kind, s):
    schedule = DiscreteVPSchedule(ALPHAS_CUMPROD)
    cls = VPEpsDenoiser if kind == "eps" else VPVDenoiser
    d = cls(vp_oracle(kind, s), schedule)
    t = torch.tensor([0, 17, 250, 999])
    sigma = schedule.sigmas[t]
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64) * (1 + sigma.view(-1, 1, 1, 1))
    torch.testing.assert_close(d(x, sigma), exact_x0(x, sigma, s), rtol=1e-9, atol=1e-9)


def test_vp_factory_and_bounds():
    d = vp_denoiser(vp_oracle("v"), ALPHAS_CUMPROD, "v_prediction")
    assert isinstance(d, VPVDenoiser)
    assert d.sigma_min == pytest.approx(math.sqrt((1 - ALPHAS_CUMPROD[0]) / ALPHAS_CUMPROD[0]))
    assert d.sigma_max == pytest.approx(math.sqrt((1 - ALPHAS_CUMPROD[-1]) / ALPHAS_CUMPROD[-1]))
    with pytest.raises(ValueError):
        vp_denoiser(vp_oracle("eps"), ALPHAS_CUMPROD, "sample")


def test_vp_input_scaling_and_v_coefficients():
    """The network sees x / sqrt(sigma^2 + 1); v-prediction x0 = x/(s^2+1) - s/sqrt(s^2+1) v."""
    seen = {}

    def net(x_t, t, cond):
        seen["x_t"], seen["t"] = x_t, t
        return torch.ones_like(x_t)

    schedule = DiscreteVPSchedule(ALPHAS_CUMPROD)
    sigma = schedule.sigmas[torch.tensor([500])]
    x = torch.full((1, 2, 3, 3), 3.0, dtype=torch.float64)
    x0 = VPVDenoiser(net, schedule)(x, sigma)
    s = float(sigma)
    torch.testing.assert_close(seen["x_t"], x / math.sqrt(s * s + 1))
    assert float(seen["t"]) == pytest.approx(500, abs=1e-4)
    torch.testing.assert_close(x0, torch.full_like(x, 3 / (s * s + 1) - s / math.sqrt(s * s + 1)))
    x0 = VPEpsDenoiser(net, schedule)(x, sigma)
    torch.testing.assert_close(x0, x - s)


@pytest.mark.parametrize("interp", ["log", "linear"])
def test_vp_sigma_t_round_trip(interp):
    schedule = DiscreteVPSchedule(ALPHAS_CUMPROD, interp=interp)
    t = torch.tensor([0.0, 0.25, 1.5, 10.0, 499.9, 998.5, 999.0], dtype=torch.float64)
    torch.testing.assert_close(schedule.sigma_to_t(schedule.t_to_sigma(t)), t, rtol=0, atol=1e-8)
    # integer timesteps hit the training sigmas exactly, whatever the interpolation
    ti = torch.arange(0, 1000, 37, dtype=torch.float64)
    torch.testing.assert_close(schedule.t_to_sigma(ti), schedule.sigmas[ti.long()])
    torch.testing.assert_close(schedule.sigma_to_t(schedule.sigmas[ti.long()]), ti, rtol=0, atol=1e-8)
    # out of range sigmas clamp to the ends
    assert float(schedule.sigma_to_t(torch.tensor([1e-6]))) == 0
    assert float(schedule.sigma_to_t(torch.tensor([1e6]))) == 999


def test_vp_log_interp_matches_k_diffusion_formula():
    """Between training sigmas, t is linear in log sigma (k-diffusion's sigma_to_t)."""
    schedule = DiscreteVPSchedule(ALPHAS_CUMPROD, interp="log")
    log_sigmas = schedule.log_sigmas.numpy()
    sigma = np.array([0.05, 0.5, 1.0, 3.0, 14.0])
    t = schedule.sigma_to_t(torch.from_numpy(sigma)).numpy()
    expected = np.interp(np.log(sigma), log_sigmas, np.arange(1000))
    np.testing.assert_allclose(t, expected, atol=1e-9)
    lin = DiscreteVPSchedule(ALPHAS_CUMPROD, interp="linear").sigma_to_t(torch.from_numpy(sigma)).numpy()
    np.testing.assert_allclose(lin, np.interp(sigma, schedule.sigmas.numpy(), np.arange(1000)), atol=1e-9)


def flow_oracle(s=S, scale=1.0):
    """Exact velocity v = E[eps - x0 | x_t] for x_t = (1 - t) x0 + t eps."""

    def net(x_t, t_in, cond):
        t = (t_in.double() / scale).view(-1, 1, 1, 1)
        x_t = x_t.double()
        var = (1 - t) ** 2 * s**2 + t**2
        resid = x_t - (1 - t) * MU
        x0 = MU + (1 - t) * s**2 * resid / var
        eps = t * resid / var
        return eps - x0

    return net


@pytest.mark.parametrize("scale", [1.0, 1000.0])
@pytest.mark.parametrize("s", [S, 0.0])
def test_flow_wrapper_returns_exact_x0(scale, s):
    d = FlowDenoiser(flow_oracle(s, scale), timestep_scale=scale)
    sigma = torch.tensor([0.01, 0.3, 1.0, 7.0, 200.0], dtype=torch.float64)
    x = torch.randn(5, 2, 3, 3, dtype=torch.float64) * (1 + sigma.view(-1, 1, 1, 1))
    # t_in is float32: allow float32 rounding of the time
    torch.testing.assert_close(d(x, sigma), exact_x0(x, sigma, s), rtol=1e-5, atol=1e-5)


def test_flow_sigma_t_round_trip():
    t = torch.tensor([0.0, 1e-4, 0.2, 0.5, 0.9, 0.999], dtype=torch.float64)
    torch.testing.assert_close(flow_sigma_to_t(flow_t_to_sigma(t)), t)
    sigma = torch.tensor([0.0, 0.01, 1.0, 80.0], dtype=torch.float64)
    torch.testing.assert_close(flow_t_to_sigma(flow_sigma_to_t(sigma)), sigma)
    assert flow_t_to_sigma(0.5) == 1.0
    d = FlowDenoiser(flow_oracle(), t_min=0.01, t_max=0.99)
    assert d.sigma_min == pytest.approx(0.01 / 0.99) and d.sigma_max == pytest.approx(99.0)
    # x_t = x / (1 + sigma) is the rectified-flow interpolation of x0 and eps
    x0, eps, t = torch.randn(3), torch.randn(3), 0.3
    x = x0 + flow_t_to_sigma(t) * eps
    torch.testing.assert_close(x / (1 + flow_t_to_sigma(t)), (1 - t) * x0 + t * eps)


def test_wrappers_keep_float32():
    schedule = DiscreteVPSchedule(ALPHAS_CUMPROD)
    d = VPEpsDenoiser(lambda x_t, t, c: torch.zeros_like(x_t), schedule)
    x = torch.randn(2, 4, dtype=torch.float32)
    assert d(x, torch.tensor([1.0, 2.0])).dtype == torch.float32
    f = FlowDenoiser(lambda x_t, t, c: torch.zeros_like(x_t))
    assert f(x, torch.tensor([1.0, 2.0])).dtype == torch.float32
