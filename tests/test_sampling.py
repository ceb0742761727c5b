import math

import pytest
import torch

from noisesearch.budget import Budget, CostModel
from noisesearch.errors import BudgetError
from noisesearch.models.toy import PointMixtureDenoiser
from noisesearch.noise import NoiseSource
from noisesearch.sampling import EulerAncestral, HeunChurn, State, karras_sigmas, make_sampler


def streams(n, d, seed=0):
    """One noise stream per search, as strategies get them."""
    return NoiseSource(seed, d.sample_shape, [(i, 0) for i in range(n)])


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
    g = streams(64, d)
    state = s.start(d.encode(["0"] * 64), g.normal(torch.arange(64)))
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
    noises = [streams(16, d, seed=i).normal(torch.arange(16)) for i in range(9)]

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
    g = streams(32, d, seed=1)
    h.rollout(h.start(d.encode(["0"] * 32), g.normal(torch.arange(32))), g)
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
    st = s.start(d.encode(["0", "1", "2"]), streams(3, d).normal(torch.arange(3)))
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
    st = s.start(d.encode(["0"] * 2), streams(2, d).normal(torch.arange(2)))
    with pytest.raises(ValueError, match="noise shape"):
        s.step(st, torch.zeros(3, 1, 1, 2))
    with pytest.raises(ValueError, match="injects noise"):
        s.step(st, None)


def test_budget_charges_per_search_and_never_lets_a_search_exceed():
    cost = CostModel(flops_per_nfe=2.0, flops_per_reward=5.0, flops_per_decode=1.0)
    b = Budget(3, nfe=10, cost=cost)
    b.charge(torch.tensor([0, 0, 1]), cost.nfe(1), "nfe")
    b.charge(torch.tensor([2]), cost.reward(1), "reward")
    assert b.nfe.tolist() == [2, 1, 0] and b.reward_calls.tolist() == [0, 0, 1]
    assert b.flops.tolist() == [4.0, 2.0, 6.0]  # a reward call pays its decode
    assert b.affords(cost.nfe(8)) and not b.affords(cost.nfe(9))
    assert b.fit(lambda n: cost.nfe(4 * n)) == 2
    with pytest.raises(BudgetError, match="budget exceeded"):
        b.charge(torch.tensor([0] * 9), cost.nfe(1), "nfe")
    assert b.nfe.tolist() == [2, 1, 0]  # a refused charge changes nothing
    f = Budget(1, flops=20, cost=cost)
    assert f.fit(lambda n: n * (cost.nfe(5) + cost.reward(1))) == 1  # one unit costs 16 FLOPs
    with pytest.raises(BudgetError, match="budget too small"):
        f.fit(lambda n: n * cost.nfe(11))
    for bad in ({}, {"nfe": float("nan")}, {"nfe": float("inf")}, {"flops": -1.0}):
        with pytest.raises(BudgetError):
            Budget(1, **bad)


def test_check_spent_catches_a_plan_that_differs_from_the_spend():
    cost = CostModel(1.0, 2.0)
    b = Budget(2, nfe=100, cost=cost)
    before = b.snapshot()
    b.charge(torch.tensor([0, 1]), cost.nfe(3), "nfe")
    b.check_spent(before, cost.nfe(3))
    with pytest.raises(RuntimeError, match="accounting defect"):
        b.check_spent(before, cost.nfe(4))
    b.check_spent(before, cost.nfe(4), exact=False)  # a worst-case plan (MCTS) may be under-spent


def test_sampler_charges_the_budget_before_calling_the_network():
    d = toy()
    b = Budget(2, nfe=5)
    s = EulerAncestral(d, 12, budget=b)
    g = streams(2, d)
    st = s.start(d.encode(["0", "1"]), g.normal(torch.arange(2)))
    with pytest.raises(BudgetError):
        s.rollout(st, g)
    assert int(b.nfe.max()) <= 5 and d.calls == int(b.nfe.sum())


def test_draws_do_not_depend_on_row_order():
    # row r gets the next draw of its search's stream, whether the rows are grouped by search or not
    keys = [(0, 0), (1, 0), (2, 0)]
    grouped = NoiseSource(5, (2,), keys).normal(torch.tensor([0, 0, 1, 2, 2, 2]))
    mixed = NoiseSource(5, (2,), keys).normal(torch.tensor([2, 0, 2, 1, 0, 2]))
    # stream 0's two draws, stream 1's one, stream 2's three, in row order within each stream
    assert torch.equal(mixed[[1, 4]], grouped[[0, 1]]) and torch.equal(mixed[3], grouped[2])
    assert torch.equal(mixed[[0, 2, 5]], grouped[[3, 4, 5]])


def test_noise_steps_follow_the_schedule():
    from noisesearch.sampling.schedules import vp_sigmas

    d = PointMixtureDenoiser(torch.zeros(2, 1, 2, 2))
    s = EulerAncestral(d, 8)
    assert s.noise_steps() == [i for i in range(8) if s.uses_noise(i)] == list(range(7))
    s.sigmas = vp_sigmas(8, float(s.sigmas[0]))  # another schedule: worked out again
    assert s.noise_steps() == [i for i in range(8) if s.uses_noise(i)]


@pytest.mark.parametrize("sampler", ["euler-ancestral", "heun"])
@pytest.mark.parametrize("same_step", [False, True], ids=["mixed-steps", "one-step"])
def test_step_rows_takes_each_row_one_step(sampler, same_step):
    # rows at their own steps (the last included, which lands on x0) move as ``step`` moves each row:
    # one network call for all (euler-ancestral) or one step per distinct step (the generic rule)
    d = toy()
    s = make_sampler(sampler, d, 6)
    n = 7
    g = streams(n, d)
    cond = d.encode(["0"] * n)
    start = s.start(cond, g.normal(torch.arange(n)))
    steps = [2] * n if same_step else [0, 1, 2, 3, 4, 5, 5]
    states = []
    for r, t in enumerate(steps):  # row r walked to step t
        st = State(start.x[r:r + 1], start.x0[r:r + 1], 0, d.encode(["0"]), torch.tensor([r]), True)
        for i in range(t):
            st = s.step(st, g.normal(torch.tensor([r])) if s.uses_noise(i) else None)
        states.append(st)
    x = torch.cat([st.x for st in states])
    x0 = torch.cat([st.x0 for st in states])
    noise = torch.randn(n, *d.sample_shape)
    xn, x0n, at_x = s.step_rows(x, x0, steps, noise, cond, torch.arange(n), [st.x0_at_x for st in states])
    for r, st in enumerate(states):
        one = s.step(st, noise[r:r + 1] if s.uses_noise(st.step) else None)
        torch.testing.assert_close(xn[r:r + 1], one.x, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x0n[r:r + 1], one.x0, rtol=1e-5, atol=1e-6)
        assert at_x[r] == one.x0_at_x
