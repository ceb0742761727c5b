"""``noisesearch tune`` on synthetic pools: other step counts, reward scales, missing noise-aware
scores, multi-reward; held-out report and bad input."""
import json

import numpy as np
import pytest

from noisesearch.cli import main
from noisesearch.pruning import BudgetAwarePolicy, PrunePlan
from noisesearch.simulate import CostSpec, Replay
from noisesearch.simulate.synthetic import make_synthetic_pool
from noisesearch.simulate.tuning import TuneConfig, budget_aware_from, tune

FAST = ["--explore", "12", "--iters-explore", "4", "--iters-confirm", "8", "--iters-test", "8", "--no-progress"]


def run_tune(tmp_path, pool, *extra):
    d = pool.save(tmp_path / "pool")
    out = tmp_path / "tune.json"
    rc = main(["tune", "--pool", str(d), "--train-prompts", "0:12", "--test-prompts", "12:24",
               "--json", str(out), *FAST, *extra])
    return rc, (json.loads(out.read_text()) if out.exists() else None)


def test_tune_single_reward_other_steps_and_scale(tmp_path):
    pool = make_synthetic_pool(num_prompts=24, num_candidates=48, num_steps=12, scale=250.0, offset=-40.0,
                               informativeness=3.0, seed=4, flops_per_step=1e11, flops_per_reward=5e10)
    rc, d = run_tune(tmp_path, pool, "--reward", "r1", "--cost-model", "exact")
    assert rc == 0
    assert d["chosen"] in ("tuned", "budget-aware")
    assert isinstance(d["test_auc_gain"], float) and isinstance(d["published_test_auc_gain"], float)
    assert d["test_auc_gain"] > 0  # informative early steps: pruning beats best-of-N on held-out prompts
    assert d["search"]["space"]["steps"] == [0, 10]
    assert set(d["strategies"]) == {"tuned", "budget-aware", "published"}
    # the result replays in simulate
    rc = main(["simulate", "--pool", str(tmp_path / "pool"), "--reward", "r1", "--method", "tuned,budget-aware",
               "--from", str(tmp_path / "tune.json"), "--iters", "3", "--prompts", "12:24",
               "--json", str(tmp_path / "sim.json"), "--no-progress"])
    assert rc == 0
    assert set(json.loads((tmp_path / "sim.json").read_text())["auc_gain"]) == {"tuned", "budget-aware"}


def test_tune_without_noise_aware_and_multi(tmp_path):
    pool = make_synthetic_pool(num_prompts=24, num_candidates=32, num_steps=6, rewards=("x", "y"),
                               noise_aware=False, seed=7)
    rc, d = run_tune(tmp_path, pool, "--reward", "x,y", "--cost-model", "reference", "--budgets", "1:12:1",
                     "--budget-unit", "images")
    assert rc == 0
    assert d["search"]["space"]["scoring"] == ["ttsp"] and d["search"]["space"]["aggregate"] == ["rank", "zsum"]
    assert set(d["test_auc_gain"]) == {"x", "y"}
    assert len(d["budgets"]) == 12


def test_tune_tiny_step_count_falls_back_to_best_of_n():
    pool = make_synthetic_pool(num_prompts=6, num_candidates=10, num_steps=1, seed=1)
    replay = Replay(pool, ["r1"])
    cost = CostSpec.from_pool(pool, ["r1"], "exact")
    res = tune(replay, None, cost, np.arange(1, 6) * cost.best_of_n, TuneConfig(explore=3, iters_explore=2, iters_confirm=2))
    assert res["strategies"]["tuned"]["method"] == "best-of-n"


def test_partial_noise_aware_is_used(tmp_path):
    pool = make_synthetic_pool(num_prompts=24, num_candidates=32, num_steps=10, na_missing_from=0.3, seed=3)
    rc, d = run_tune(tmp_path, pool, "--reward", "r1")
    assert rc == 0 and "ttsnap" in d["search"]["space"]["scoring"]


def test_budget_aware_table():
    plans = [PrunePlan(), PrunePlan.from_dict({"method": "ttsnap", "steps": [1], "keep": [0.5]})]
    curves = {plans[0]: np.array([[1.0], [2.0], [3.0]]), plans[1]: np.array([[0.5], [2.5], [3.5]])}
    ba = budget_aware_from(curves, [1.0, 2.0, 3.0], [1.0], window=0)
    assert ba.plans == (plans[0], plans[1], plans[1])
    assert ba.plan_for(1.1) == plans[0] and ba.plan_for(2.9) == plans[1]
    back = BudgetAwarePolicy.from_dict(ba.describe())
    assert back.plans == ba.plans


@pytest.mark.parametrize("argv, message", [
    (["--reward", "r1", "--train-prompts", "0:12", "--test-prompts", "10:20"], "overlap"),
    (["--reward", "zz", "--train-prompts", "0:12"], "unknown reward"),
    (["--reward", "r1", "--train-prompts", "0:50"], "out of range"),
    (["--reward", "r1", "--train-prompts", "0:12", "--budgets", "10:100:10"], "below the cost of one candidate"),
    (["--reward", "r1", "--train-prompts", "0:12", "--iters-explore", "0"], "must be >= 1"),
])
def test_tune_bad_input(tmp_path, argv, message, capsys):
    d = make_synthetic_pool(num_prompts=24, num_candidates=16, num_steps=6).save(tmp_path / "pool")
    assert main(["tune", "--pool", str(d), *argv, "--no-progress"]) == 2
    assert message in capsys.readouterr().err
