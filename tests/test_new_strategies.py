"""The newest methods (EvoSearch ``evo``, rollover budget forcing ``rbf``, Diffusion Tree Sampling
``dts``) and ``auto``: their paper's mechanics on the toy of ``test_strategies``, and a run within
budget on tiny FLUX and tiny SDXL pipelines (random weights, built from configs: tests/tiny.py).
The shared checks (plan equals spend, budgets, seeds, improvement over naive) are in test_strategies.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from noisesearch import api
from noisesearch.models import load_model
from noisesearch.sampling.schedules import vp_sigmas
from noisesearch.search import dts, make_strategy
from noisesearch.search.auto import TABLE, reward_price, table_choice
from test_strategies import STEPS, ModeReward, make_problem, run

pytestmark = pytest.mark.usefixtures("one_thread")


def test_evo_population_schedule_and_elites():
    problem, res = run("evo", {"population": 4, "generations": 3, "first_population": 2.0}, nfe=400, n=6)
    info = res.info
    assert info["population_schedule"] == [8, 4, 4] and info["elites"] == 1
    assert info["evolution_schedule"][0] == 0 and info["evolution_schedule"] == sorted(info["evolution_schedule"])
    # the plan: 8 trajectories, then 3 mutated children (1 NFE each) and 4 rollouts per later generation
    s = problem.sampler
    t1, t2 = info["evolution_schedule"][1:]
    assert problem.budget.nfe.tolist() == [8 * STEPS + 3 + 4 * s.nfe_to_end(t1) + 3 + 4 * s.nfe_to_end(t2)] * 6
    assert problem.budget.reward_calls.tolist() == [16] * 6


def test_evo_elites_keep_the_best_reward():
    # the returned reward is the best any generation scored: never below generation 0's best
    _, one = run("evo", {"population": 4, "generations": 1}, nfe=400, n=6, seed=3)
    _, many = run("evo", {"population": 4, "generations": 3, "first_population": 1.0}, nfe=400, n=6, seed=3)
    assert one.info["population_schedule"] == [4]
    assert (many.rewards >= one.rewards - 1e-6).all()  # same first generation (same streams), then only better


def test_evo_selects_from_the_archive_of_every_generation():
    # generation g picks its parents among all states recorded at its step: gen 0's 8 at t1, then
    # gen 0's 8 and gen 1's 4 at t2
    _, res = run("evo", {"population": 4, "generations": 3, "first_population": 2.0}, nfe=400, n=6)
    t1, t2 = res.info["evolution_schedule"][1:]
    assert res.info["archive_sizes"] == {t1: 8, t2: 12}


def test_evo_archive_keeps_rows_with_their_fitness():
    from noisesearch.sampling.samplers import State
    from noisesearch.search.evo import _Archive

    def batch(values, per):  # 2 searches, ``per`` rows each; x carries the row's own fitness value
        v = torch.tensor(values, dtype=torch.float32)
        return State(v.view(-1, 1), v.view(-1, 1), 3, None, torch.arange(2).repeat_interleave(per)), v

    archive = _Archive(2)
    archive.add(3, *batch([1.0, 2.0, 10.0, 20.0], 2))
    archive.add(3, *batch([3.0, 4.0, 5.0, 30.0, 40.0, 50.0], 3))
    states, fitness = archive.at(3)
    assert fitness.tolist() == [[1, 2, 3, 4, 5], [10, 20, 30, 40, 50]]
    assert states.x.flatten().tolist() == fitness.flatten().tolist()
    assert states.owner.tolist() == [0] * 5 + [1] * 5


def test_rbf_rolls_unused_budget_over():
    problem, res = run("rbf", {"candidates": 44, "score_every": 1}, nfe=400, n=6)
    assert res.info["rollovers"] > 0
    # plan: one trajectory + 33 extra candidate steps (44 over 11 searched steps), 44 + 1 reward calls
    assert problem.budget.nfe.tolist() == [STEPS + 44 - 11] * 6
    assert problem.budget.reward_calls.tolist() == [45] * 6


@pytest.mark.parametrize("sampler", ["euler-ancestral", "heun"])
def test_rbf_searches_walk_on_their_own(sampler):
    """Each search walks the steps at its own pace (a wave takes one move of every search, wherever it
    is): a search's result does not depend on the searches batched with it, and there are at most as
    many waves as a search makes moves (not one per draw of the slowest search at every step)."""
    opts = {"candidates": 44, "score_every": 1}
    big, res6 = run("rbf", opts, nfe=400, n=6, sampler=sampler)
    _, res3 = run("rbf", opts, nfe=400, n=3, sampler=sampler)
    torch.testing.assert_close(res6.x0[:3], res3.x0, rtol=1e-4, atol=1e-5)
    assert res6.rewards[:3].tolist() == pytest.approx(res3.rewards.tolist(), rel=1e-4, abs=1e-5)
    assert res6.info["waves"] <= int(big.budget.nfe.max())
    assert res6.info["rollovers"] > 0


def test_rbf_waves_take_one_row_per_search():
    """Every search makes as many moves as the others, so a wave is one row of every search (one
    batch shape for an Euler-ancestral network call, however far each search is) until all stand at
    the last searched step, whose remaining draws go in one call."""
    from noisesearch.search import rbf as rbf_module

    problem, calls, waves = make_problem(nfe=400, n=6), [], []
    problem.sampler.on_call = calls.append
    wave = rbf_module._Walk.wave

    def counted(self):  # the network calls' sizes of each wave
        start = len(calls)
        going = wave(self)
        if going:
            waves.append(set(calls[start:]))
        return going

    rbf_module._Walk.wave = counted
    try:
        with torch.no_grad():
            res = make_strategy("rbf", candidates=44, score_every=1).search(problem)
    finally:
        rbf_module._Walk.wave = wave
    assert res.info["waves"] == len(waves)
    big = [i for i, w in enumerate(waves) if max(w, default=0) > 6]
    assert len(big) == 1 and all(v % 6 == 0 for v in waves[big[0]])  # the last searched step's draws
    assert all(w <= {6} for i, w in enumerate(waves) if i != big[0])  # every other wave: 6 rows a call
    assert problem.budget.nfe.tolist() == [res.info["planned_per_sample"]["nfe"]] * 6  # still the plan


def test_rbf_last_step_in_calls_of_max_batch():
    # the last searched step's remaining draws go in calls of at most max_batch rows (a call's states
    # and estimates are all held at once): the same samples as in one call
    opts = {"candidates": 44, "score_every": 1}
    problem, calls = make_problem(nfe=400, n=6, max_batch=8), []
    problem.sampler.on_call = calls.append
    with torch.no_grad():
        small = make_strategy("rbf", **opts).search(problem)
    _, whole = run("rbf", opts, nfe=400, n=6)
    assert max(calls) <= 8 and calls.count(8) > 1
    torch.testing.assert_close(small.x0, whole.x0, rtol=1e-4, atol=1e-5)
    assert problem.budget.nfe.tolist() == [small.info["planned_per_sample"]["nfe"]] * 6


def test_rbf_with_a_trace_scores_each_step_apart():
    # a trace records the scores of one step at a time, so a wave's reward call is split by step:
    # every reward call scores rows of one step (the step its rows moved from, plus one), the same
    # samples as without a trace, and every reward call is recorded once
    from noisesearch.search import rbf as rbf_module
    from noisesearch.search.trace import SearchTrace

    opts = {"candidates": 44, "score_every": 1}
    problem = make_problem(nfe=400, n=6)
    problem.trace = SearchTrace(owners=set(range(6)))
    walks, calls, score = [], [], problem.score

    def checked(state, *a, **k):  # the rows' own steps, read from the walk before it moves them
        if walks and state.step < problem.sampler.num_steps:
            calls.append(bool((walks[-1].step[state.owner.numpy()] + 1 == state.step).all()))
        return score(state, *a, **k)

    problem.score = checked
    start = rbf_module._Walk.__init__

    def init(self, *a):
        start(self, *a)
        walks.append(self)

    rbf_module._Walk.__init__ = init
    try:
        with torch.no_grad():
            traced = make_strategy("rbf", **opts).search(problem)
    finally:
        rbf_module._Walk.__init__ = start
    _, plain = run("rbf", opts, nfe=400, n=6)
    torch.testing.assert_close(traced.x0, plain.x0, rtol=1e-4, atol=1e-5)
    assert calls and all(calls)
    assert sum(len(r.owner) for r in problem.trace.records) == int(problem.budget.reward_calls.sum())


def test_vp_interpolant_schedule():
    sig = vp_sigmas(10, 80.0)
    assert len(sig) == 11 and sig[0] == 80.0 and sig[-1] == 0 and bool((sig[:-1] > sig[1:]).all())
    flow = vp_sigmas(6, float("inf"))
    assert math.isinf(flow[0]) and bool(torch.isfinite(flow[1:]).all())
    _, res = run("rbf", {"interpolant": "vp"}, nfe=120, n=4)
    assert res.info["interpolant"] == "vp"


def test_dts_reuses_the_tree():
    problem, res = run("dts", {"iterations": 40}, nfe=400, n=6)
    # rollouts from deeper nodes are cheaper: more rollouts than the allowance buys full ones
    # (40 x 0.5 x 11 = 220 NFEs: 20 rollouts from the root)
    assert res.info["rollouts_mean"] > 20
    assert res.info["nodes_mean"] > 20
    assert int(problem.budget.nfe.max()) <= res.info["planned_per_sample"]["nfe"]


def test_dts_chain_value_is_the_soft_value_of_one_child():
    # the new path's values are computed without the log-sum-exp: they must be what the backup computes
    lam = 10.0
    v = np.concatenate([np.random.default_rng(0).normal(0, 50, 2000), [0.0, -0.0, 1e-300, -1e300, np.inf, -np.inf]])
    tree = dts.Tree(1, v.size + 1, 3, (1,), "cpu", torch.float32)
    tree.child[: v.size, 0] = np.arange(v.size) + 1  # node i has the one child i + 1, holding v[i]
    tree.n_children[: v.size] = 1
    tree.value[1 : v.size + 1] = v
    tree.backup_level(np.arange(v.size), lam, boltzmann=True)
    expected = tree.value[: v.size]
    got = dts.chain_value(v, lam)
    # two computations (numpy arithmetic vs torch's vectorised log-sum-exp over a batch): equal up to
    # the last bits of exp/log on another CPU, so within a few ulp; the sign of zero is IEEE addition
    np.testing.assert_allclose(got, expected, rtol=1e-15, atol=0)
    assert np.array_equal(np.signbit(got), np.signbit(expected))


@pytest.mark.parametrize("selection", ["boltzmann", "greedy"])
def test_dts_tree_holds_soft_values_and_selection_caches(selection, monkeypatch):
    trees = []

    class Recorded(dts.Tree):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            trees.append(self)

    monkeypatch.setattr(dts, "Tree", Recorded)
    problem, res = run("dts", {"iterations": 30, "children": 2, "selection": selection}, nfe=400, n=4)
    tree, lam, T = trees[0], 10.0, STEPS - 1
    assert torch.equal(res.rewards, torch.from_numpy(tree.best_value).float())
    for p in range(4):
        rows = np.arange(tree.base[p], tree.base[p] + tree.count[p])
        ch = tree.child[rows]
        assert np.array_equal(tree.n_children[rows], (ch >= 0).sum(1))
        assert np.array_equal(tree.full[rows], tree.n_children[rows] >= 2)
        leaves = rows[tree.n_children[rows] == 0]
        assert (tree.depth[leaves] == T).all() and tree.best_value[p] == tree.value[leaves].max()
        assert tree.best_node[p] in leaves and tree.value[tree.best_node[p]] == tree.best_value[p]
        inner = rows[tree.n_children[rows] > 0]
        logits = torch.from_numpy(np.where(tree.child[inner] >= 0, tree.value[tree.child[inner]], -np.inf) * lam)
        soft = (torch.logsumexp(logits, 1) - torch.log(torch.from_numpy(tree.n_children[inner]).double())) / lam
        assert torch.allclose(torch.from_numpy(tree.value[inner]), soft, rtol=1e-12, atol=1e-12)
        full = tree.full[inner]
        if selection == "greedy":
            assert np.array_equal(tree.greedy[inner][full], logits[full].argmax(1).numpy())
        else:
            cum = torch.softmax(logits[full], 1).cumsum(1)
            assert torch.allclose(torch.from_numpy(tree.cum[inner][full]), cum, rtol=1e-12, atol=1e-12)


def test_auto_follows_the_table():
    assert sorted(TABLE) == [0.0, 0.25, 1.0]
    assert table_choice(0.0, 4)[0].name == "rbf"
    assert table_choice(0.3, 5)[0].name == table_choice(1.0, 5)[0].name == "rbf"
    assert table_choice(5.0, 100)[0].name == "beam"  # above the table: its most expensive row
    assert table_choice(0.0, 8)[0].name == table_choice(0.25, 30)[0].name == "beam"
    assert table_choice(1.0, 19)[0].name == "rbf"  # the largest measured budget at most the problem's
    assert table_choice(0.0, 1)[0].name == "rbf"  # below the table: its smallest budget
    problem = make_problem(nfe=144, n=4)
    assert reward_price(problem) == 0.0
    res = make_strategy("auto").search(problem)
    assert res.info["auto"]["strategy"] == table_choice(0.0, 144 / STEPS)[0].name
    # under a FLOP budget the reward's price counts: 3 FLOPs per call over 10 per NFE
    problem = make_problem(flops=144 * 10.0, n=4)
    assert reward_price(problem) == pytest.approx(0.3)


@pytest.mark.parametrize("which", ["flux", "sdxl"])
@pytest.mark.parametrize("strategy", ["evo", "rbf", "rbf-vp", "dts", "auto"])
def test_runs_within_budget_on_tiny_pipelines(which, strategy, request):
    path = request.getfixturevalue(f"tiny_{which}_dir")
    d = load_model(path, height=32, width=32, guidance=1.0)
    budget = 24  # 6 trajectories of 4 steps
    options = {"interpolant": "vp"} if strategy == "rbf-vp" else {}  # on FLUX: from sigma = inf
    run_ = api.generate(model=d, prompts=["a red bicycle"], reward="brightness", strategy=strategy.split("-")[0],
                        budget_nfe=budget, steps=4, seed=0, evaluate=False, max_batch=8, num_samples=2,
                        strategy_options=options)
    assert run_.report["nfe_max"] <= budget
    assert run_.images.shape[0] == 2 and torch.isfinite(run_.images).all()


def test_mode_reward_is_the_toy_reward():
    problem = make_problem(nfe=24, n=2)
    assert isinstance(problem.reward, ModeReward)
