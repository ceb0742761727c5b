"""Pruning rules, cost models, the Monte Carlo engine, metrics and ``noisesearch simulate``."""
import json
from pathlib import Path

import numpy as np
import pytest

from noisesearch.cli import main
from noisesearch.errors import NoiseSearchError
from noisesearch.pools import Pool
from noisesearch.pruning import (
    PruneSchedule,
    best_of_n_cost,
    cost_per_start,
    keep_count,
    order_keys,
    rank_sum,
    realised_cost,
    select_rank_sum,
    select_survivors,
    select_top,
    starts_for_budget,
    zscore_sum,
)
from noisesearch.simulate import (
    BestOfNPolicy,
    CostSpec,
    FixedPolicy,
    PrunePlan,
    Replay,
    auc_gain,
    draw_subsets,
    expected_best_of_n,
    simulate,
)
from noisesearch.simulate.synthetic import make_synthetic_pool

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO / ".." / "shared" / "data" / "ttsnap-flux"
T = 1e12


def load_benchmark():
    import noisesearch.bench.simulate as mod

    return mod


# ---- pruning rules -------------------------------------------------------------------------------
def test_keep_count_matches_python_round():
    assert keep_count(10, 0.4) == 4
    assert keep_count(5, 0.5) == 2  # round half to even, as the authors' Python round
    assert keep_count(7, 0.5) == 4
    assert keep_count(3, 0.1) == 1  # at least one
    assert keep_count(0, 0.5) == 0
    assert keep_count(77, 0.4) == 31


def test_schedule_validation():
    with pytest.raises(NoiseSearchError):
        PruneSchedule((6, 2), (0.5, 0.5))
    with pytest.raises(NoiseSearchError):
        PruneSchedule((2, 2), (0.5, 0.5))
    with pytest.raises(NoiseSearchError):
        PruneSchedule((2,), (0.5, 0.5))
    with pytest.raises(NoiseSearchError):
        PruneSchedule((2,), (0.0,))
    with pytest.raises(NoiseSearchError):
        PruneSchedule((2,), (1.5,))
    with pytest.raises(NoiseSearchError):
        PruneSchedule((-1,), (0.5,))
    with pytest.raises(NoiseSearchError, match="out of range"):
        PruneSchedule((19,), (0.5,)).validate(20)
    PruneSchedule((18,), (0.5,)).validate(20)
    assert PruneSchedule.parse("2,6,11", "0.4,0.4,0.5") == PruneSchedule((2, 6, 11), (0.4, 0.4, 0.5))
    s = PruneSchedule.from_fractions([2 / 19, 6 / 19, 11 / 19], [0.4, 0.4, 0.5], 20)
    assert s.steps == (2, 6, 11)
    s = PruneSchedule.from_fractions([0.1, 0.11], [0.5, 0.5], 5)  # merged after rounding
    assert s.steps == (0,) and s.keep == (0.25,)
    assert PruneSchedule((2, 6), (0.4, 0.5)).survivors(77) == [77, 31, 16]


def test_selection_ties_go_to_lower_index():
    s = np.array([1.0, 3.0, 3.0, 2.0, 3.0])
    assert list(order_keys(s)) == [0, 4, 3, 1, 2]
    assert list(select_top(s, 2)) == [1, 2]
    assert list(select_top(np.stack([s, -s]), 1, axis=-1)[:, 0]) == [1, 0]
    a = np.array([3.0, 2.0, 1.0, 0.0])
    b = np.array([0.0, 1.0, 2.0, 3.0])
    assert list(rank_sum([a, b])) == [3, 3, 3, 3]
    assert list(select_rank_sum([a, b], 2)) == [0, 1]
    c = np.array([0.0, 0.0, 5.0, 0.0])  # ranks: a [3, 2, 1, 0]; c [2, 1, 3, 0] (ties to the lower index)
    assert list(rank_sum([a, c])) == [5, 3, 4, 0]
    assert list(select_rank_sum([a, c], 2)) == [0, 2]
    z = zscore_sum([a, 10 * b + 7])
    np.testing.assert_allclose(z, 0.0, atol=1e-12)  # scale-free: opposite orders cancel
    assert list(select_survivors([np.array([0.0, 1.0, 0.5])], 2)) == [1, 2]


# ---- cost models ---------------------------------------------------------------------------------
def test_costs_by_hand():
    sch = PruneSchedule((2, 6, 11), (0.4, 0.4, 0.5))
    c, r = 9.9 * T, 1.2 * T
    assert best_of_n_cost(20, c, r) == pytest.approx(199.2 * T)
    # reference: 1*(2c+r) + .4*(4c+r) + .16*(5c+r) + .08*(8c+r)
    ref = (2 * c + r) + 0.4 * (4 * c + r) + 0.16 * (5 * c + r) + 0.08 * (8 * c + r)
    assert cost_per_start(sch, 20, c, r, "reference") == pytest.approx(ref) == pytest.approx(51.864 * T)
    assert cost_per_start(sch, 20, c, r, "exact") == pytest.approx(ref + c)
    # the authors' starts: int(B / 51.864)
    assert starts_for_budget(400 * T, sch, 20, c, r, "reference") == 7
    assert starts_for_budget(4000 * T, sch, 20, c, r, "reference") == 77
    assert starts_for_budget(4000 * T, sch, 20, c, r, "reference", max_starts=50) == 50
    # exact, 10 starts: survivors 10 -> 4 -> 2 -> 1
    exact10 = 10 * 3 * c + 10 * r + 4 * 4 * c + 4 * r + 2 * 5 * c + 2 * r + 1 * 8 * c + 1 * r
    assert realised_cost(sch, 10, 20, c, r, "exact") == pytest.approx(exact10)
    # one start: every check is skipped (nothing to prune), so it costs one best-of-N candidate
    assert realised_cost(sch, 1, 20, c, r, "exact") == pytest.approx(199.2 * T)
    # multi-reward: exact pays every reward model, reference one evaluation
    assert best_of_n_cost(20, c, [r, r, r], "exact") == pytest.approx(201.6 * T)
    assert best_of_n_cost(20, c, [r, r, r], "reference") == pytest.approx(199.2 * T)


def test_exact_starts_never_exceed_budget():
    rng = np.random.default_rng(0)
    for _ in range(200):
        k = int(rng.integers(0, 4))
        steps = tuple(sorted(rng.choice(19, k, replace=False).tolist()))
        sch = PruneSchedule(steps, tuple(rng.uniform(0.05, 1.0, k).round(2)))
        B = float(rng.uniform(200, 8000)) * T
        n = starts_for_budget(B, sch, 20, 9.9 * T, [1.2 * T, 0.5 * T], "exact")
        assert realised_cost(sch, n, 20, 9.9 * T, [1.2 * T, 0.5 * T]) <= B
        assert realised_cost(sch, n + 1, 20, 9.9 * T, [1.2 * T, 0.5 * T]) > B


# ---- metrics -------------------------------------------------------------------------------------
def test_auc_gain_hand_example():
    # shifted baseline [0, 1, 2] -> Simpson area 2; shifted curve [0, 2, 3] -> 11/3
    assert auc_gain([0, 1, 2], [1, 3, 4], [1, 2, 3]) == pytest.approx(100 * (11 / 3 - 2) / 2)
    # invariant to positive affine rescaling of the reward and to the budget unit
    assert auc_gain([0, 10, 20], [101, 301, 401], [101, 201, 301]) == pytest.approx(83.3333333)
    assert np.isnan(auc_gain([0, 1, 2], [1, 2, 3], [1, 1, 1]))


def test_closed_form_matches_monte_carlo():
    pool = make_synthetic_pool(num_prompts=20, num_candidates=30, num_steps=4, seed=3)
    replay = Replay(pool, ["r1"])
    cost = CostSpec.from_pool(pool, ["r1"], "exact")
    budgets = np.array([1, 2, 5, 10, 20, 30]) * cost.best_of_n
    sim = simulate(replay, [BestOfNPolicy()], budgets, cost, iters=400, seed=1)
    m = sim.methods["best-of-n"]
    assert m.starts == [1, 2, 5, 10, 20, 30]
    exact = expected_best_of_n(pool.final("r1"), m.starts)
    z = (m.curve[:, 0] - exact) / np.maximum(m.stderr[:, 0], 1e-12)
    assert np.abs(z[:-1]).max() < 4.5  # n = N has no variance: the subset is the whole pool
    assert m.curve[-1, 0] == pytest.approx(exact[-1])
    # brute force on a tiny case: E[max of a 2-subset of {1, 2, 4}] = (2 + 4 + 4) / 3
    assert expected_best_of_n(np.array([[4.0, 1.0, 2.0]]), 2) == pytest.approx(10 / 3)


# ---- engine --------------------------------------------------------------------------------------
def test_engine_matches_straightforward_loop():
    """The vectorised engine and the benchmark's per-prompt loop agree exactly on the same draws,
    ties included (quantised rewards), single and multi-reward."""
    bench = load_benchmark()
    pool = make_synthetic_pool(num_prompts=7, num_candidates=25, num_steps=8, rewards=("a", "b", "c"),
                               quantize=0.25, seed=5)
    for rewards in (["a"], ["a", "b", "c"]):
        cost = CostSpec.from_pool(pool, rewards, "exact")
        budgets = np.array([1, 2, 4, 8, 12]) * cost.best_of_n
        plans = {"best-of-n": PrunePlan(), "ttsp": PrunePlan(PruneSchedule((1, 3, 5), (0.5, 0.6, 0.5)), False),
                 "ttsnap": PrunePlan(PruneSchedule((0, 4), (0.3, 0.5)), True)}
        perms = draw_subsets(pool.num_candidates, 6, 2)
        sim = simulate(Replay(pool, rewards), [FixedPolicy(p, n) for n, p in plans.items() if n != "best-of-n"],
                       budgets, cost, 6, perms=perms)
        loop = bench.loop_simulate(pool, rewards, plans, budgets, cost, 6, perms=perms)
        for name in plans:
            np.testing.assert_allclose(sim.methods[name].curve, loop[name], rtol=0, atol=1e-12)
    # z-sum aggregation agrees too (continuous values: no ties)
    pool = make_synthetic_pool(num_prompts=5, num_candidates=20, num_steps=6, rewards=("a", "b"), seed=6)
    cost = CostSpec.from_pool(pool, ["a", "b"], "exact")
    plan = PrunePlan(PruneSchedule((1, 3), (0.5, 0.5)), True, "zsum")
    budgets = np.array([2, 6]) * cost.best_of_n
    perms = draw_subsets(20, 4, 0)
    sim = simulate(Replay(pool, ["a", "b"]), [FixedPolicy(plan, "z")], budgets, cost, 4, perms=perms)
    loop = bench.loop_simulate(pool, ["a", "b"], {"z": plan}, budgets, cost, 4, perms=perms)
    np.testing.assert_allclose(sim.methods["z"].curve, loop["z"], atol=1e-12)


def test_pruning_keeps_an_obvious_best():
    """Candidate 3 leads at every step: whenever it is drawn, pruning must return it."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=(4, 30, 6)).astype(np.float32)
    base[:, 3, :] = 10.0
    pool = Pool.from_arrays({"r": base}, {"r": base.copy()}, flops_per_step=1.0, flops_per_reward={"r": 0.1})
    cost = CostSpec.from_pool(pool, ["r"], "exact")
    budgets = np.array([20, 60, 200.0])
    sim = simulate(Replay(pool, ["r"]), [FixedPolicy(PrunePlan(PruneSchedule((0, 2), (0.2, 0.5)), True), "p")], budgets, cost, 30, seed=0)
    perms = draw_subsets(30, 30, 0)
    for bi, n in enumerate(sim.methods["p"].starts):
        has_best = (perms[:, :n] == 3).any(1)
        np.testing.assert_allclose(sim.methods["p"].per_iter[has_best, bi, 0], 10.0)
    assert sim.methods["p"].starts[-1] == 30 and sim.methods["p"].capped[-1]


def test_noise_aware_missing_falls_back_to_base():
    pool = make_synthetic_pool(num_prompts=5, num_candidates=20, num_steps=6, noise_aware=False, seed=1)
    cost = CostSpec.from_pool(pool, ["r1"], "exact")
    budgets = np.array([3, 8]) * cost.best_of_n
    sch = PruneSchedule((1, 3), (0.5, 0.5))
    sim = simulate(Replay(pool, ["r1"]), [FixedPolicy(PrunePlan(sch, True), "snap"), FixedPolicy(PrunePlan(sch, False), "sp")], budgets, cost, 5)
    np.testing.assert_array_equal(sim.methods["snap"].per_iter, sim.methods["sp"].per_iter)


def test_budget_checks():
    pool = make_synthetic_pool(num_prompts=3, num_candidates=10, num_steps=5)
    cost = CostSpec.from_pool(pool, ["r1"], "exact")
    with pytest.raises(NoiseSearchError, match="below the cost of one candidate"):
        simulate(Replay(pool, ["r1"]), [], np.array([0.5, 2]) * cost.best_of_n, cost, 2)
    with pytest.raises(NoiseSearchError, match="increasing"):
        simulate(Replay(pool, ["r1"]), [], np.array([3, 2]) * cost.best_of_n, cost, 2)
    with pytest.raises(NoiseSearchError, match="FLOPs per denoising step"):
        CostSpec.from_pool(pool.with_metadata(flops_per_step=0.0), ["r1"])


# ---- reproduction on the published pools ---------------------------------------------------------
@pytest.mark.skipif(not (SHARED / "prompts.json").exists(), reason="shared TTSnap pools not available")
def test_reproduces_published_gains():
    """Reference cost model, the authors' protocol: +27 / +31 / +37 % single, +13 / +23 / +26 % multi.

    Tolerance 2 points: the Monte Carlo standard error of a gain is about 0.5 points at 50
    iterations (0.55 at 40), so 2 points is about 4 standard errors; the estimates land within
    0.8 points of the published figures.
    """
    from noisesearch.pools import load_pool

    pool = load_pool(SHARED)
    for r, published in (("hps", 27), ("imr", 31), ("pic", 37)):
        cost = CostSpec.from_pool(pool, [r], "reference")
        sim = simulate(Replay(pool, [r]), [FixedPolicy(PrunePlan(PruneSchedule((2, 6, 11), (0.4, 0.4, 0.5))), "ttsnap")],
                       np.arange(400, 4001, 200) * T, cost, 50, seed=0)
        assert abs(sim.gain("ttsnap")[0][0] - published) < 2, r
    rs = ["imr", "pic", "hps"]
    cost = CostSpec.from_pool(pool, rs, "reference")
    sim = simulate(Replay(pool, rs), [FixedPolicy(PrunePlan(PruneSchedule((4, 6, 11), (0.4, 0.5, 0.6))), "ttsnap")],
                   np.arange(200, 4001, 200) * T, cost, 40, seed=0)
    np.testing.assert_allclose(sim.gain("ttsnap")[0], [13, 23, 26], atol=2)


# ---- CLI -----------------------------------------------------------------------------------------
@pytest.fixture()
def pool_dir(tmp_path):
    pool = make_synthetic_pool(num_prompts=8, num_candidates=40, num_steps=10, rewards=("a", "b"), seed=2)
    return str(pool.save(tmp_path / "pool"))


def test_cli_simulate_single_and_multi(pool_dir, tmp_path):
    out = tmp_path / "out.json"
    rc = main(["simulate", "--pool", pool_dir, "--reward", "a", "--method", "ttsnap,ttsp", "--steps", "1,4",
               "--keep", "0.5,0.5", "--budgets", "400:2000:400", "--iters", "5", "--json", str(out),
               "--plot", str(tmp_path / "p.png"), "--no-progress"])
    assert rc == 0
    d = json.loads(out.read_text())
    assert d["budgets"] == [400, 800, 1200, 1600, 2000]
    assert set(d["curves"]) == {"best-of-n", "ttsnap", "ttsp"} and len(d["curves"]["ttsnap"]) == 5
    assert set(d["auc_gain"]) == {"ttsnap", "ttsp"} and isinstance(d["auc_gain"]["ttsnap"], float)
    assert len(d["best_of_n_closed_form"]) == 5
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    out2 = tmp_path / "multi.json"
    rc = main(["simulate", "--pool", pool_dir, "--reward", "a,b", "--method", "ttsnap", "--steps", "1,4",
               "--keep", "0.5,0.5", "--budgets", "1:10:1", "--budget-unit", "images", "--iters", "3",
               "--aggregate", "zsum", "--json", str(out2), "--no-progress"])
    assert rc == 0
    d = json.loads(out2.read_text())
    assert set(d["auc_gain"]) == {"a", "b"} and set(d["curves"]["ttsnap"]) == {"a", "b"}


@pytest.mark.parametrize("argv, message", [
    (["--reward", "nope"], "unknown reward"),
    (["--reward", "a", "--budgets", "100:2000:100"], "below the cost of one candidate"),
    (["--reward", "a", "--method", "magic"], "unknown method"),
    (["--reward", "a", "--prompts", "0:99"], "out of range"),
    (["--reward", "a", "--steps", "1,12", "--keep", "0.5,0.5"], "out of range"),
    (["--reward", "a", "--steps", "1,4"], "together"),
    (["--reward", "a", "--budgets", "4:1:1"], "--budgets"),
    (["--reward", "a", "--method", "tuned"], "needs --from"),
    (["--reward", "a", "--flops-per-step", "lots"], "FLOP count"),
])
def test_cli_simulate_bad_input(pool_dir, argv, message, capsys):
    rc = main(["simulate", "--pool", pool_dir, "--iters", "2", "--no-progress", *argv])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_cli_bad_pools(tmp_path, capsys):
    d = tmp_path / "bad"
    d.mkdir()
    np.save(d / "m_r_base.npy", np.zeros((2, 3), np.float32))  # wrong dimensions
    (d / "prompts.json").write_text('["a", "b"]')
    assert main(["simulate", "--pool", str(d), "--reward", "r", "--no-progress"]) == 2
    assert "3 dimensions" in capsys.readouterr().err
    arr = np.zeros((2, 3, 4), np.float32)
    arr[0, 0, 0] = np.nan
    np.save(d / "m_r_base.npy", arr)  # NaN in a base reward
    assert main(["simulate", "--pool", str(d), "--reward", "r", "--no-progress"]) == 2
    assert "NaN" in capsys.readouterr().err
    np.save(d / "m_r_base.npy", np.zeros((2, 3, 4), np.float32))
    np.save(d / "m_q_base.npy", np.zeros((2, 3, 5), np.float32))  # shapes disagree across rewards
    assert main(["simulate", "--pool", str(d), "--reward", "r", "--no-progress"]) == 2
    assert "share" in capsys.readouterr().err
