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


# ---- network_denoiser: every declared parametrisation maps to the same exact x0 -------------------

from noisesearch.errors import NoiseSearchError  # noqa: E402
from noisesearch.models.wrappers import (  # noqa: E402
    EDM,
    VE,
    VPSDE,
    DiscreteVP,
    NetworkDenoiser,
    RectifiedFlow,
    network_denoiser,
)

LINEAR = dict(beta_min=0.1, beta_max=20.0)


def frame_of(process_kind, t_in):
    """(alpha, std) of the network's frame x_t = alpha x0 + std eps from its time input, written out
    independently of the wrappers."""
    t = t_in.double().view(-1, 1, 1, 1)
    if process_kind == "discrete":
        assert torch.allclose(t, t.round(), atol=1e-6), t
        a = ALPHAS_CUMPROD[t.round().long().flatten()].view(-1, 1, 1, 1)
        return a.sqrt(), (1 - a).sqrt()
    if process_kind in ("vpsde", "vpsde-t"):
        tt = t / 999 if process_kind == "vpsde" else t
        big_b = 0.1 * tt + 0.5 * 19.9 * tt**2 if process_kind == "vpsde" else tt
        return (-big_b / 2).exp(), (1 - (-big_b).exp()).sqrt()
    if process_kind == "ve":
        return torch.ones_like(t), t
    if process_kind == "edm":
        sigma = (4 * t).exp()
        alpha = 1 / (sigma**2 + 0.25).sqrt()
        return alpha, alpha * sigma
    tt = t / 1000  # rectified flow with time_scale 1000
    return 1 - tt, tt


class GaussianOracle(torch.nn.Module):
    """The exact prediction of type ``kind`` for x0 ~ N(MU, S^2) in the frame of ``process_kind``."""

    def __init__(self, process_kind, kind):
        super().__init__()
        self.process_kind, self.kind = process_kind, kind
        self.anchor = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))  # float64 placement

    def forward(self, x_t, t_in):
        alpha, std = frame_of(self.process_kind, t_in)
        var = alpha**2 * S**2 + std**2
        resid = x_t - alpha * MU
        x0, eps = MU + alpha * S**2 * resid / var, std * resid / var
        if self.kind == "eps":
            return eps
        if self.kind == "x0":
            return x0
        if self.kind == "score":
            return -resid / var
        if self.kind == "v":  # VP frames only: alpha^2 + std^2 = 1
            return alpha * eps - std * x0
        if self.kind == "velocity":
            return eps - x0
        sigma, sd = std / alpha, 0.5  # EDM's F = (x0 - c_skip x) / c_out
        c_skip, c_out = sd**2 / (sigma**2 + sd**2), sigma * sd / (sigma**2 + sd**2).sqrt()
        return (x0 - c_skip * x_t / alpha) / c_out


PROCESSES = {
    "discrete": lambda: DiscreteVP(ALPHAS_CUMPROD),
    "vpsde": lambda: VPSDE(**LINEAR, time_scale=999),
    "vpsde-t": lambda: VPSDE(int_beta=lambda t: t, t_min=1e-3, t_max=10.0),
    "ve": lambda: VE(0.01, 100.0),
    "edm": lambda: EDM(sigma_data=0.5),
    "flow": lambda: RectifiedFlow(time_scale=1000.0),
}
CASES = [("discrete", k) for k in ("eps", "v", "x0", "score")] + [("vpsde", k) for k in ("eps", "v", "x0", "score")] + [
    ("vpsde-t", "score"), ("vpsde-t", "eps"), ("ve", "eps"), ("ve", "x0"), ("ve", "score"), ("edm", "edm"),
    ("edm", "eps"), ("edm", "score"), ("flow", "velocity"), ("flow", "eps"), ("flow", "x0")]


@pytest.mark.parametrize("process_kind,kind", CASES)
def test_network_denoiser_every_parametrisation_gives_the_exact_x0(process_kind, kind):
    process = PROCESSES[process_kind]()
    d = network_denoiser(GaussianOracle(process_kind, kind), kind, process, (2, 3, 3), flops_per_call=1.0)
    if process_kind == "discrete":
        sigma = process.schedule.sigmas[torch.tensor([0, 17, 250, 999])]
    else:
        sigma = torch.tensor([0.02, 0.4, 3.0, 60.0], dtype=torch.float64)
    x = MU + S * torch.randn(4, 2, 3, 3, dtype=torch.float64) + sigma.view(-1, 1, 1, 1) * torch.randn(4, 2, 3, 3,
                                                                                                     dtype=torch.float64)
    torch.testing.assert_close(d(x, sigma, None), exact_x0(x, sigma), rtol=1e-8, atol=1e-8)


def test_vpsde_time_maps_round_trip_and_bisection_matches_closed_form():
    linear, custom = VPSDE(**LINEAR), VPSDE(int_beta=lambda t: 0.1 * t + 9.95 * t**2)
    t = torch.tensor([1e-3, 0.01, 0.3, 0.77, 1.0, 1.5], dtype=torch.float64)  # 1.5: above t_max
    sigma = linear.t_to_sigma(t)
    torch.testing.assert_close(linear.sigma_to_t(sigma), t)
    torch.testing.assert_close(custom.sigma_to_t(sigma), t, rtol=1e-10, atol=1e-12)
    assert linear.sigma_max == pytest.approx(math.sqrt(math.exp(0.1 + 9.95) - 1))
    galaxy = VPSDE(int_beta=lambda t: t, inverse_int_beta=lambda b: b, t_max=10.0)
    assert galaxy.sigma_max == pytest.approx(math.sqrt(math.exp(10) - 1))  # about 148
    assert float(galaxy.time(torch.tensor([galaxy.sigma_max]))) == pytest.approx(10.0)


def test_score_adapter_is_the_galaxygrad_formula():
    """x0 = x + (s^2 / a) score(a x, t), a = exp(-t/2), s^2 = 1 - exp(-t), for int_beta(t) = t."""
    seen = {}

    def net(x_t, t):
        seen["x_t"], seen["t"] = x_t, t
        return torch.full_like(x_t, 0.5)

    d = network_denoiser(net, "score", VPSDE(int_beta=lambda t: t, t_max=10.0), (1, 2, 2), flops_per_call=1.0)
    t = 2.0
    sigma = torch.tensor([math.sqrt(math.exp(t) - 1)])
    x = torch.full((1, 1, 2, 2), 3.0)
    x0 = d(x, sigma, None)
    a, s2 = math.exp(-t / 2), 1 - math.exp(-t)
    torch.testing.assert_close(seen["x_t"], a * x)
    assert float(seen["t"]) == pytest.approx(t, rel=1e-6)
    torch.testing.assert_close(x0, x + s2 / a * 0.5)


def test_network_denoiser_is_a_full_denoiser():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 8), torch.nn.Unflatten(1, (2, 2, 2))).eval()
    d = NetworkDenoiser(lambda_net(net), "eps", EDM(), (2, 2, 2), name="tiny")
    assert d.flops_per_call == 2 * 8 * 8  # counted: one 8x8 matmul per sample
    assert d.name == "tiny" and not d.conditional and d.flops_per_decode == 0.0
    assert d.sigma_min == 0.002 and d.sigma_max == 80.0 and d.parametrisation.startswith("eps / edm")
    cond = d.encode(["anything", ""])
    assert cond.shape[0] == 2
    x0 = d(torch.randn(2, 2, 2, 2), torch.tensor([1.0, 2.0]), cond)
    assert x0.shape == (2, 2, 2, 2) and x0.dtype == torch.float32
    img = d.decode(torch.tensor([[[[-3.0, -1.0], [0.0, 1.0]]] * 2]))
    assert float(img.min()) == 0.0 and float(img.max()) == 1.0


def lambda_net(net):
    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = net

        def forward(self, x_t, t):
            return self.inner(x_t)

    return Wrapped()


def test_network_denoiser_refuses_bad_declarations():
    net = lambda_net(torch.nn.Identity())
    with pytest.raises(NoiseSearchError, match="unknown prediction"):
        network_denoiser(net, "noise-ish", EDM(), (1,), flops_per_call=1.0)
    with pytest.raises(NoiseSearchError, match="RectifiedFlow"):
        network_denoiser(net, "velocity", VPSDE(), (1,), flops_per_call=1.0)
    with pytest.raises(NoiseSearchError, match="encode"):
        network_denoiser(net, "eps", EDM(), (1,), conditional=True, flops_per_call=1.0)
    with pytest.raises(NoiseSearchError, match="noise process"):
        network_denoiser(net, "eps", "vp", (1,), flops_per_call=1.0)
    with pytest.raises(NoiseSearchError, match="t_min"):
        VPSDE(t_min=2.0, t_max=1.0)


def test_conditional_network_gets_its_condition():
    def net(x_t, t, cond):
        return cond.view(-1, 1, 1) * torch.ones_like(x_t)

    d = network_denoiser(net, "x0", VE(0.01, 10.0), (1, 2), conditional=True, flops_per_call=1.0,
                         encode=lambda prompts: torch.tensor([float(p) for p in prompts]))
    x0 = d(torch.zeros(2, 1, 2), torch.tensor([1.0, 1.0]), d.encode(["3", "5"]))
    assert x0[:, 0, 0].tolist() == [3.0, 5.0]


def test_network_denoiser_runs_a_search():
    from noisesearch.api import generate

    d = network_denoiser(GaussianOracle("vpsde", "eps"), "eps", VPSDE(**LINEAR, time_scale=999), (2, 3, 3),
                         flops_per_call=1.0)
    run = generate(model=d, prompts=["a"], reward="brightness", strategy="best-of-n", budget_nfe=40, steps=10,
                   num_samples=2, seed=0, evaluate=False)
    assert run.images.shape == (2, 2, 3, 3)
    assert run.report["samples"][0]["nfe"] <= 40


def test_byo_doc_snippets_run_in_order(tmp_path, monkeypatch, capsys):
    import re
    from pathlib import Path

    monkeypatch.chdir(tmp_path)
    doc = Path(__file__).resolve().parents[1] / "docs" / "byo.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)
    assert len(blocks) >= 5
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(doc), "exec"), namespace)
    assert namespace["galaxy_like"].sigma_max == pytest.approx(math.sqrt(math.exp(10) - 1))
    assert namespace["run"].report["reward"] == "redness"
    assert namespace["cond"].conditional and namespace["cond"].flops_per_call > 0
