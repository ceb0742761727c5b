"""Live pruning (ttsnap / ttsp): same survivors as the simulator on a pool of the same seeds, exact
accounting within the budget, CLI and errors."""
from __future__ import annotations

import json

import numpy as np
import pytest

from noisesearch import api
from noisesearch.api.pool import generate_pool
from noisesearch.budget import largest_affordable
from noisesearch.errors import BudgetError, NoiseSearchError
from noisesearch.pruning import PruneSchedule, keep_count, pruned_run_counts, realised_cost, starts_for_budget
from noisesearch.simulate.engine import Replay
from noisesearch.train.noise_aware import TrainConfig, train_noise_aware

PROMPTS = ["0", "4", "8"]
STEPS = 8  # sampler steps -> 8 pool steps



@pytest.fixture(scope="module")
def na_dir(tmp_path_factory):
    """A tiny noise-aware digit reward (stages for steps 1 and 3 of 8)."""
    root = tmp_path_factory.mktemp("live")
    generate_pool("digits", ["digit"], [str(i) for i in range(10)], 6, root / "train", guidance=0, steps=STEPS,
                  seed=100, save_images=True)
    train_noise_aware(root / "train", root / "na", TrainConfig(reward="digit", steps=(1, 3), iters=5, batch_size=32,
                                                               lr=3e-3), log=lambda *a: None)
    return root / "na"


def _simulated(pool, n, schedule, noise_aware):
    """Survivors per check, the chosen candidate, and per check whether every cut had a clear margin
    (the live run scores in other batch shapes: a near tie may break the other way on some CPUs)."""
    rep = Replay(pool, ["digit"])
    sel = np.arange(n)[None, None, :]  # the same subset (the first n candidates) for every prompt
    alive, out, clear = n, [], []
    for step, frac in zip(schedule.steps, schedule.keep):
        table = (pool.noise_aware if noise_aware else pool.rewards)["digit"][:, :, step]
        scores = np.sort(np.take_along_axis(table, sel[:, 0, :], axis=1), axis=1)[:, ::-1]
        k = keep_count(alive, frac)
        clear.append(bool(np.all(scores[:, k - 1] - scores[:, k] > 1e-4)) if k < alive else True)
        alive = k
        sel = rep.prune(sel, step, alive, noise_aware)
        out.append(np.sort(sel[:, 0, :], axis=1))
    return out, rep.choose(sel)[:, 0], clear


@pytest.mark.parametrize("method", ["ttsnap", "ttsp"])
def test_live_survivors_equal_the_simulators(method, na_dir, tmp_path):
    from noisesearch.models import load_model
    from noisesearch.rewards import make_reward

    den, reward = load_model("digits", guidance=0), make_reward("digit")
    c, r = den.flops_per_call, reward.flops_per_image
    schedule = PruneSchedule((1, 3, 5), (0.5, 0.5, 0.6))
    budget = 7.5 * (STEPS * c + r)  # 7.5 best-of-N candidates' worth
    opts = dict(prune_steps=schedule.steps, keep=schedule.keep)
    if method == "ttsnap":
        opts["prune_reward"] = str(na_dir)
    run = api.generate(model=den, prompts=PROMPTS, reward=reward, strategy=method, budget_flops=budget, steps=STEPS,
                       seed=7, guidance=0, strategy_options=opts, evaluate=False, max_batch=16)
    info = run.report["strategy_info"]
    n = info["candidates"]
    # the number of starts and the charge are the simulator's exact cost model
    assert n == starts_for_budget(budget, schedule, STEPS, c, r, "exact") > 7
    assert info["alive"] == schedule.survivors(n)
    spent = realised_cost(schedule, n, STEPS, c, r, "exact")
    assert run.report["flops_per_sample_max"] == pytest.approx(spent, rel=1e-12) and spent <= budget
    assert all(s["flops"] == pytest.approx(spent) for s in run.report["samples"])
    assert run.report["nfe_max"] == pruned_run_counts(schedule, n, list(range(1, STEPS + 1)), STEPS)[0]

    # a pool of the same seed and prompts holds exactly these candidates: replay the schedule on it
    specs = ["digit"] + ([f"noise-aware@{na_dir}"] if method == "ttsnap" else [])
    pool = generate_pool(den, specs, PROMPTS, n + 3, tmp_path / "pool", seed=7, steps=STEPS)
    survivors, chosen, clear = _simulated(pool, n, schedule, noise_aware=method == "ttsnap")
    for live, sim, ok in zip(info["survivors"], survivors, clear):
        if not ok:  # a near tie at this cut: the rest may legitimately differ
            break
        assert np.array_equal(np.array(live), sim)
    else:
        assert info["chosen"] == chosen.tolist()
    np.testing.assert_allclose(run.report["reward_mean"], pool.final("digit")[np.arange(3), chosen].mean(), rtol=1e-4)
    if method == "ttsnap":  # the noise-aware reward changed the decision somewhere (else the test proves little)
        base_surv, _, _ = _simulated(pool, n, schedule, noise_aware=False)
        assert any(not np.array_equal(a, b) for a, b in zip(base_surv, survivors))


def test_nfe_budget_and_a_prune_reward_with_its_own_cost():
    run = api.generate(model="digits", prompts=["5"], reward="digit", strategy="ttsp", budget_nfe=100, steps=STEPS,
                       seed=0, guidance=0, strategy_options=dict(prune_steps=(2,), keep=(0.25,)), evaluate=False)
    info = run.report["strategy_info"]
    sched = PruneSchedule((2,), (0.25,))
    n = info["candidates"]
    assert n == starts_for_budget(100, sched, STEPS, 1.0, 0.0) and run.report["nfe_max"] <= 100
    assert pruned_run_counts(sched, n + 1, list(range(1, STEPS + 1)), STEPS)[0] > 100

    # pruning with brightness (free) while the final reward costs FLOPs: each charged at its own price
    from noisesearch.models import load_model
    from noisesearch.rewards import make_reward

    den, reward = load_model("digits", guidance=0), make_reward("digit")
    c, r = den.flops_per_call, reward.flops_per_image
    budget = 5 * (STEPS * c + r)
    run = api.generate(model=den, prompts=["5", "6"], reward=reward, strategy="ttsp", budget_flops=budget, steps=STEPS,
                       seed=0, guidance=0, evaluate=False,
                       strategy_options=dict(prune_steps=(2,), keep=(0.25,), prune_reward="brightness"))
    info = run.report["strategy_info"]
    n = info["candidates"]
    nfe_at = list(range(1, STEPS + 1))

    def flops(m):  # prune calls (brightness) are free, the final calls cost the digit reward
        nfe, prune_calls, final_calls = pruned_run_counts(sched, m, nfe_at, STEPS)
        return nfe * c + final_calls * r, prune_calls + final_calls

    assert run.report["flops_per_sample_max"] == pytest.approx(flops(n)[0]) and flops(n)[0] <= budget
    assert flops(n + 1)[0] > budget
    assert flops(n)[0] < realised_cost(sched, n, STEPS, c, r)  # cheaper than charging the digit price
    assert run.report["reward_calls"] == 2 * flops(n)[1]


def test_starts_are_the_largest_affordable():
    sched = PruneSchedule((2, 6, 11), (0.4, 0.4, 0.5))
    for B in (400, 1000, 3999, 4000):
        n = starts_for_budget(B, sched, 20, 9.9, 1.2)
        assert realised_cost(sched, n, 20, 9.9, 1.2) <= B < realised_cost(sched, n + 1, 20, 9.9, 1.2)
        assert n == largest_affordable(lambda m: realised_cost(sched, m, 20, 9.9, 1.2) <= B)
    assert largest_affordable(lambda m: m * 10.0 <= 1.0) == 0


def test_errors(tmp_path, na_dir, monkeypatch, capsys):
    with pytest.raises(BudgetError, match="budget too small"):
        api.generate(model="digits", prompts=["5"], reward="digit", strategy="ttsp", budget_nfe=STEPS - 1, steps=STEPS,
                     guidance=0, evaluate=False, strategy_options=dict(prune_steps=(2,), keep=(0.5,)))
    with pytest.raises(NoiseSearchError, match="out of range"):
        api.generate(model="digits", prompts=["5"], reward="digit", strategy="ttsp", budget_nfe=100, steps=STEPS,
                     guidance=0, evaluate=False, strategy_options=dict(prune_steps=(7,), keep=(0.5,)))
    monkeypatch.chdir(tmp_path)  # the strategy reads no files: without --prune-reward it prunes with the reward
    run = api.generate(model="digits", prompts=["5"], reward="digit", strategy="ttsnap", budget_nfe=100, steps=STEPS,
                       guidance=0, evaluate=False, strategy_options=dict(prune_steps=(2,), keep=(0.5,)))
    assert run.report["strategy_info"]["prune_reward_noise_aware"] is False
    from noisesearch.cli import main

    base = ["generate", "--model", "digits", "--guidance", "0", "--prompt", "3", "--reward", "digit", "--steps",
            str(STEPS), "--no-progress", "--out", str(tmp_path / "g")]
    capsys.readouterr()
    assert main(base + ["--strategy", "ttsnap", "--prune-reward", str(tmp_path / "none"), "--budget-nfe", "80"]) == 2
    assert "noise-aware" in capsys.readouterr().err
    code = main(base + ["--strategy", "ttsnap", "--prune-reward", str(na_dir), "--prune-steps", "1,3", "--keep", "0.5,0.5",
                        "--budget-nfe", "80"])
    assert code == 0, capsys.readouterr().err
    rep = json.loads((tmp_path / "g" / "report.json").read_text())
    assert rep["strategy"] == "ttsnap" and rep["nfe_max"] <= 80 and rep["strategy_info"]["prune_reward_noise_aware"]


def test_prune_reward_trained_on_another_sampler_warns(na_dir):
    # na_dir was trained on euler-ancestral pools: pruning a deterministic (euler) run with it works,
    # but says that a checkpoint trained on euler pools would rank better
    opts = dict(prune_steps=(1,), keep=(0.5,), prune_reward=str(na_dir))
    kw = dict(model="digits", prompts=["3"], reward="digit", strategy="ttsnap", budget_nfe=4 * STEPS, steps=STEPS,
              guidance=0, strategy_options=opts, evaluate=False)
    with pytest.warns(UserWarning, match="trained on euler-ancestral pools but this run samples with euler"):
        run = api.generate(sampler="euler", **kw)
    assert run.report["strategy_info"]["prune_reward_trained_on_sampler"] == ["euler-ancestral"]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the matching sampler: no warning
        api.generate(sampler="euler-ancestral", **kw)
