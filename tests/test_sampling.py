import math

import pytest
import torch

from noisesearch.budget import Budget, CostModel
from noisesearch.errors import BudgetError
from noisesearch.models.toy import PointMixtureDenoiser
from noisesearch.sampling import EulerAncestral, HeunChurn, State, karras_sigmas, make_sampler


def toy(k=4, dim=2):
    pts = torch.tensor([[-1.0, -1.0], [1.0, 1.0], [1.0, -1.0], [-1.0, 1.0]])[:k].view(k, 1, 1, dim)
    return PointMixtureDenoiser(pts)


def test_karras_sigmas_endpoints_and_monotone():
    s = karras_sigmas(18, 0.002, 80.0)
    assert len(s) == 19 and s[-1] == 0
    assert math.isclose(float(s[0]), 80.0, rel_tol=1e-9) and math.isclose(float(s[-2]), 0.002, rel_tol=1e-9)
    assert torch.all(s[:-1] > s[1:])
    # rho = 1 gives a linear ramp
    lin = karras_sigmas(5, 1.0, 5.0, rho=1.0)
    assert torch.allclose(lin[:-1], torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64))


def test_euler_ancestral_costs_one_nfe_per_step_and_lands_on_the_data():
    d = toy()
    s = EulerAncestral(d, 12)
    assert s.nfe_per_trajectory == 12
    g = torch.Generator().manual_seed(0)
    state = s.start(d.encode(["0"] * 64), s.noise(64, g))
    state = s.rollout(state, g)
    assert d.calls == 64 * 12
    assert state.step == s.num_steps
    # every final sample is (numerically) one of the mixture points
    dist = torch.cdist(state.x0.flatten(1), d.points.flatten(1)).min(1).values
    assert dist.max() < 1e-3


def test_noise_is_the_only_randomness():
    d = toy()
    s = EulerAncestral(d, 8)
    cond = d.encode(["0"] * 16)
    noises = [s.noise(16, torch.Generator().manual_seed(i)) for i in range(9)]

    def run(order):
        st = s.start(cond, noises[0])
        for i in range(s.num_steps):
            st = s.step(st, noises[order[i]] if s.uses_noise(i) else None)
        return st.x0

    a = run(list(range(1, 9)))
    b = run(list(range(1, 9)))
    c = run([1, 2, 3, 5, 4, 6, 7, 8])
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_deterministic_euler_ignores_noise_and_heun_costs_edm_2n_minus_1():
    d = toy()
    s = make_sampler("euler", d, 10)
    assert s.name == "euler" and s.eta == 0.0  # recorded as such in report.json and pool metadata
    assert not any(s.uses_noise(i) for i in range(s.num_steps))
    h = HeunChurn(d, 10, s_churn=0.0)
    assert h.nfe_per_trajectory == 2 * 10 - 1  # EDM: the start call is reused by the first step
    g = torch.Generator().manual_seed(1)
    noise = h.noise(32, g)
    st = h.rollout(h.start(d.encode(["0"] * 32), noise), g)
    assert d.calls == 32 * h.nfe_per_trajectory


def test_heun_churn_injects_noise_inside_the_churn_range():
    d = toy()
    h = HeunChurn(d, 10, s_churn=10.0, s_tmin=0.05, s_tmax=5.0)
    used = [h.uses_noise(i) for i in range(h.num_steps)]
    sig = h.sigmas[:-1]
    assert used == [bool(0.05 <= float(t) <= 5.0) for t in sig]


def test_state_select_repeat_cat_keep_rows_aligned():
    d = toy()
    s = EulerAncestral(d, 6)
    g = torch.Generator().manual_seed(0)
    st = s.start(d.encode(["0", "1", "2"]), s.noise(3, g))
    rep = st.repeat(4)
    assert len(rep) == 12 and rep.owner.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert torch.equal(rep.x[4], st.x[1]) and torch.equal(rep.cond[8], st.cond[2])
    sel = rep.select([11, 0])
    assert sel.owner.tolist() == [2, 0] and torch.equal(sel.x0[0], st.x0[2])
    both = State.cat([sel, st])
    assert len(both) == 5 and both.owner.tolist() == [2, 0, 0, 1, 2]


def test_wrong_noise_shape_is_rejected():
    d = toy()
    s = EulerAncestral(d, 6)
    st = s.start(d.encode(["0"] * 2), s.noise(2, torch.Generator()))
    with pytest.raises(ValueError, match="noise shape"):
        s.step(st, torch.zeros(3, 1, 1, 2))
    with pytest.raises(ValueError, match="injects noise"):
        s.step(st, None)


def test_budget_charges_per_search_and_never_lets_a_search_exceed():
    b = Budget(3, nfe=10, cost=CostModel(flops_per_nfe=2.0, flops_per_reward=5.0))
    b.charge_nfe(torch.tensor([0, 0, 1]))
    b.charge_reward(torch.tensor([2]))
    assert b.nfe.tolist() == [2, 1, 0] and b.reward_calls.tolist() == [0, 0, 1]
    assert b.flops.tolist() == [4.0, 2.0, 5.0]
    assert b.affords(8) and not b.affords(9)
    assert b.max_count(4) == 2
    with pytest.raises(BudgetError, match="budget exceeded"):
        b.charge_nfe(torch.tensor([0] * 9))
    assert b.nfe.tolist() == [2, 1, 0]  # a refused charge changes nothing
    f = Budget(1, flops=20, cost=CostModel(2.0, 5.0))
    assert f.max_count(5, 1) == 1  # one unit costs 15 FLOPs
    with pytest.raises(BudgetError):
        Budget(1)


def test_sampler_charges_the_budget_before_calling_the_network():
    d = toy()
    b = Budget(2, nfe=5)
    s = EulerAncestral(d, 12, budget=b)
    g = torch.Generator().manual_seed(0)
    st = s.start(d.encode(["0", "1"]), s.noise(2, g))
    with pytest.raises(BudgetError):
        s.rollout(st, g)
    assert int(b.nfe.max()) <= 5 and d.calls == int(b.nfe.sum())
