"""Sizing that fits every knob: with a priced reward, every trajectory strategy runs wherever
best-of-N affords 2 candidates, spends exactly what it planned, and shrinks its knobs (candidates per
decision, scored decisions) rather than refusing.

The toy of ``test_strategies``: 12 Euler-ancestral steps, 10 FLOPs per network call; the reward's
price is given in NFEs (``price * 10`` FLOPs per call) and the budget in FLOPs.
"""
from __future__ import annotations

import pytest
import torch

from noisesearch.budget import Budget, Cost, CostModel, SizeOption
from noisesearch.errors import BudgetError, NoiseSearchError
from noisesearch.search import make_strategy
from test_strategies import STEPS, ModeReward, make_problem

pytestmark = pytest.mark.usefixtures("one_thread")

TRAJECTORY = ["eps-greedy", "zero-order", "beam", "smc", "mcts", "evo", "rbf", "dts"]


def priced_problem(price: float, budget_nfe_equivalents: float, n: int = 6):
    problem = make_problem(flops=budget_nfe_equivalents * 10.0, n=n)
    reward = ModeReward(problem.denoiser)
    reward.flops_per_image = price * 10.0
    problem.reward = reward
    problem.budget.cost = problem.budget.cost.__class__(10.0, reward.flops_per_image, 0.0)
    return problem


def search_priced(name: str, price: float, budget: float, **options):
    """(problem, result) of strategy ``name`` with ``options`` on a fresh priced problem."""
    problem = priced_problem(price, budget)
    with torch.no_grad():
        result = make_strategy(name, **options).search(problem)
    return problem, result


def assert_spends_plan(problem, result) -> None:
    b, plan = problem.budget, result.info["planned_per_sample"]
    assert b.nfe.tolist() == [plan["nfe"]] * 6 and b.reward_calls.tolist() == [plan["reward_calls"]] * 6


def best_of_n_candidates(price: float, budget: float) -> int:
    return int(budget // (STEPS + price))


@pytest.mark.parametrize("name", TRAJECTORY)
@pytest.mark.parametrize("price", [0.25, 1.0])
def test_runs_wherever_best_of_n_has_two_candidates(name, price):
    two = 2 * (STEPS + price)
    for budget in (two, two * 1.3, two * 3, two * 10):
        assert best_of_n_candidates(price, budget) >= 2
        problem = priced_problem(price, budget)
        with torch.no_grad():
            result = make_strategy(name).search(problem)
        b, plan = problem.budget, result.info["planned_per_sample"]
        assert float(b.flops.max()) <= budget * 10.0 * (1 + 1e-12)
        if name in ("mcts", "dts"):  # their plan is a bound
            assert int(b.nfe.max()) <= plan["nfe"] and int(b.reward_calls.max()) <= plan["reward_calls"]
        else:
            assert b.nfe.tolist() == [plan["nfe"]] * 6 and b.reward_calls.tolist() == [plan["reward_calls"]] * 6


@pytest.mark.parametrize("name", ["eps-greedy", "beam", "smc"])
def test_an_expensive_reward_thins_the_knobs_instead_of_refusing(name):
    # at 1 NFE per reward call and 3 trajectories' worth, the default configuration (4 candidates at
    # every decision, or particles weighed at every decision) does not fit with 2 particles
    problem = priced_problem(1.0, 3 * (STEPS + 1))
    with torch.no_grad():
        result = make_strategy(name).search(problem)
    knobs = result.info["configuration"]
    assert knobs["score_every"] > 1 or knobs.get("n_candidates", 4) < 4
    # at an NFE budget the reward calls are free: the strategy's own configuration
    problem = make_problem(nfe=5 * STEPS * 4, n=6)
    with torch.no_grad():
        result = make_strategy(name).search(problem)
    assert result.info["configuration"]["score_every"] == 1
    assert result.info["configuration"].get("n_candidates", 4) in (0, 4)


def test_user_knobs_are_kept():
    problem = priced_problem(1.0, 5 * (STEPS + 1))
    with torch.no_grad():
        result = make_strategy("beam", n_candidates=3, score_every=2).search(problem)
    assert result.info["configuration"] == {"n_candidates": 3, "score_every": 2, "extra_candidates": 0}


def test_beam_spends_what_its_beams_leave_on_extra_candidates():
    # price 0.25, 8 trajectories' worth: one beam of 4 candidates at every decision, and the rest of the
    # budget (most of a second beam) as extra candidates, the earliest scored decisions first
    price, budget = 0.25, 8 * (STEPS + 0.25)
    problem, result = search_priced("beam", price, budget)
    info = result.info
    assert info["beams"] == 1 and info["configuration"]["n_candidates"] == 4 and info["extra_candidates"] > 0
    assert_spends_plan(problem, result)
    one_more = info["beams"] * (1 + price) * 10.0  # one more candidate per beam: its NFE and its reward call
    assert budget * 10.0 - one_more < float(problem.budget.flops.max()) <= budget * 10.0 * (1 + 1e-12)
    # a user's beams are run as given: no extras
    problem, result = search_priced("beam", price, budget, beams=1)
    assert result.info["extra_candidates"] == 0 and float(problem.budget.flops.max()) < budget * 10.0 - one_more


def test_beam_extra_candidates_go_to_the_earliest_scored_decisions():
    from noisesearch.search.beam import Beam

    assert Beam(n_candidates=4, score_every=1, extra_candidates=5).branching(4) == [6, 5, 5, 5]
    assert Beam(n_candidates=4, score_every=1, extra_candidates=0).branching(4) == [4, 4, 4, 4]
    # every 2nd decision scored (1, 3, 5): the others take one noise per beam
    assert Beam(n_candidates=3, score_every=2, extra_candidates=4).branching(6) == [1, 5, 1, 4, 1, 4]
    assert Beam(n_candidates=3, score_every=2).branching(6) == [1, 3, 1, 3, 1, 3]
    # given explicitly: run as given, on top of the fitted beams
    problem = priced_problem(0.25, 8 * (STEPS + 0.25))
    with torch.no_grad():
        result = make_strategy("beam", extra_candidates=2).search(problem)
    assert result.info["extra_candidates"] == 2 and result.info["beams"] == 1
    with pytest.raises(NoiseSearchError, match="extra-candidates"):
        make_strategy("beam", extra_candidates=-1).search(problem)


def test_evo_spends_what_its_generations_leave_on_extra_first_individuals():
    # price 1, 7 trajectories' worth: 4 generations of 2 leave more than one trajectory, which buys
    # extra individuals in generation 0 (full trajectories, one reward call each)
    price, budget = 1.0, 7 * (STEPS + 1.0)
    problem, result = search_priced("evo", price, budget)
    info = result.info
    extra = info["configuration"]["extra_first"]
    assert extra > 0 and info["population_schedule"][0] == info["population"] + extra
    assert info["population_schedule"][1:] == [info["population"]] * (info["generations"] - 1)
    assert_spends_plan(problem, result)
    one_more = (STEPS + price) * 10.0  # one more individual in generation 0
    assert budget * 10.0 - one_more < float(problem.budget.flops.max()) <= budget * 10.0 * (1 + 1e-12)
    # a user's population is run as given, without extras; extras given are run as given
    for options, first in (({"population": info["population"]}, info["population"]), ({"extra_first": 1}, None)):
        problem, result = search_priced("evo", price, budget, **options)
        got = result.info["population_schedule"][0]
        assert got == (first if first is not None else result.info["population"] + 1)
    with pytest.raises(NoiseSearchError, match="extra-first"):
        make_strategy("evo", extra_first=-1).search(problem)


def test_fit_options_rule():
    # the affordable option whose smallest size uses the largest share of the budget, then its largest size
    b = Budget(1, nfe=100)
    options = [SizeOption(lambda n: Cost(nfe=60 * n), 2), SizeOption(lambda n: Cost(nfe=30 * n), 2),
               SizeOption(lambda n: Cost(nfe=20 * n), 2), SizeOption(lambda n: Cost(nfe=10 * n), 1)]
    assert b.fit_options(options) == (1, 3)
    assert b.fit_options(options[:1] + options[3:]) == (1, 10)
    assert b.fit_options([SizeOption(lambda n: Cost(nfe=10 * n), 1, fixed=4)]) == (0, 4)
    with pytest.raises(BudgetError, match="budget too small"):
        b.fit_options(options[:1])


def test_flop_charges_keep_float64_precision():
    """int64 counts times a float price is float32 in torch: a FLUX-sized decode price charged to 24 rows
    lost 2048 FLOPs and failed the plan-equals-spend check (ttsp on a 256 px tiny FLUX)."""
    price = 18560843776.0
    b = Budget(2, flops=1e15, cost=CostModel(5671823360.0, 0.0, price))
    owner = torch.tensor([0] * 24 + [1] * 24)
    b.charge(owner, Cost(0, 1, price), "reward")
    assert b.flops.dtype == torch.float64
    assert b.flops.tolist() == [24 * price, 24 * price]
