"""Search strategies on a toy problem with a known answer, plus the CLI record of their options.

The toy: a mixture of 8 point masses in a 4-dimensional sample space (``PointMixtureDenoiser``,
exact Tweedie estimates, 12 Euler-ancestral steps = 12 NFEs per trajectory) and a reward that
prefers the mode named by the prompt: ``-|image - decode(mode)|^2`` (0 at the mode). Naive
sampling lands on the target mode with probability about 1/8.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from noisesearch.build import build_problem
from noisesearch.errors import BudgetError, NoiseSearchError
from noisesearch.models.toy import PointMixtureDenoiser
from noisesearch.noise import NoiseSource
from noisesearch.rewards.base import REWARDS
from noisesearch.search import STRATEGIES, make_strategy
from noisesearch.search.smc import resample_indices

STEPS = 12  # toy default: 12 NFEs per Euler-ancestral trajectory
P = 48  # searches per problem (all batched)

# every strategy, with the variants whose code paths differ
CASES = [
    ("naive", {}),
    ("best-of-n", {}),
    ("eps-greedy", {}),
    ("eps-greedy", {"elitist": True}),
    ("eps-greedy", {"sigma_window": (0.01, 1.0)}),
    ("eps-greedy", {"search_init": True}),
    ("zero-order", {}),
    ("beam", {}),
    ("mcts", {}),
    ("mcts", {"search_init": True}),
    ("smc", {}),
    ("smc", {"potential": "max", "resampling": "multinomial"}),
    ("ttsp", {}),
    ("ttsnap", {"prune_reward": "toy-mode"}),
    ("evo", {}),
    ("rbf", {}),
    ("rbf", {"interpolant": "vp"}),
    ("dts", {}),
    ("dts", {"selection": "greedy"}),
    ("auto", {}),  # the name stands for a PruneModeReward object (see `run`)
]
IDS = [name + "".join(f"-{k}={v}" for k, v in opts.items()) for name, opts in CASES]


class ModeReward:
    """Negative squared distance of the image to the decoded target mode (the prompt)."""

    name = "mode"
    flops_per_image = 3.0

    def __init__(self, den: PointMixtureDenoiser):
        self.den = den

    def __call__(self, images, prompts):
        target = self.den.decode(self.den.points[[int(p) for p in prompts]])
        return -((images - target) ** 2).flatten(1).sum(1)


class PruneModeReward(ModeReward):
    """The same reward at another price: the prune reward of the ``ttsnap`` cases (``toy-mode``)."""

    name = "toy-mode"
    flops_per_image = 5.0


def toy_mode_reward(arg, device):
    return PruneModeReward(toy_denoiser())


REWARDS["toy-mode"] = "test_strategies:toy_mode_reward"


pytestmark = pytest.mark.usefixtures("one_thread")


def toy_denoiser(flops_per_decode: float = 0.0) -> PointMixtureDenoiser:
    """The pixel toy (decode is free) or, with ``flops_per_decode``, a "latent" toy whose decode costs."""
    g = torch.Generator().manual_seed(123)
    return PointMixtureDenoiser(torch.randn(8, 1, 2, 2, generator=g).clamp(-1, 1), flops_per_call=10.0,
                                flops_per_decode=flops_per_decode)


def make_problem(nfe=None, flops=None, seed=0, sampler="euler-ancestral", n=P, target="3", decode=0.0, max_batch=512):
    den = toy_denoiser(decode)
    return build_problem(den, ModeReward(den), [target], num_samples=n, budget_nfe=nfe, budget_flops=flops,
                         steps=STEPS, sampler=sampler, seed=seed, max_batch=max_batch)


def strategy(name, opts):
    """``make_strategy`` with the prune reward named ``toy-mode`` passed as the object it names
    (strategies take Reward objects; names are resolved in build.py)."""
    if opts.get("prune_reward") == "toy-mode":
        opts = {**opts, "prune_reward": PruneModeReward(toy_denoiser())}
    return make_strategy(name, **opts)


def run(name, opts, **kw):
    """A problem (see ``make_problem``) and the result of strategy ``name`` on it."""
    problem = make_problem(**kw)
    with torch.no_grad():
        result = strategy(name, opts).search(problem)
    return problem, result


def test_every_registered_strategy_is_covered():
    assert set(STRATEGIES) <= {name for name, _ in CASES}


@pytest.mark.parametrize("name,opts", CASES, ids=IDS)
@pytest.mark.parametrize("decode", [0.0, 7.0], ids=["pixel", "latent"])
@pytest.mark.parametrize("kind", ["nfe", "flops"])
def test_plan_equals_spend(name, opts, decode, kind):
    # every search spends exactly what the strategy planned (MCTS: at most its worst case), a reward
    # call costs the reward plus the decode of the estimate it scores, and nothing goes over budget
    limits = {"nfe": 203} if kind == "nfe" else {"flops": 2903.0}
    problem, result = run(name, opts, n=6, decode=decode, **limits)
    b, plan = problem.budget, result.info["planned_per_sample"]
    spent = {"nfe": b.nfe.tolist(), "calls": b.reward_calls.tolist(), "flops": b.flops.tolist()}
    if name in ("mcts", "dts"):  # their plan is a bound (a rollout from a deeper node costs less)
        assert max(spent["nfe"]) <= plan["nfe"] and max(spent["calls"]) <= plan["reward_calls"]
    else:
        assert spent["nfe"] == [plan["nfe"]] * 6 and spent["calls"] == [plan["reward_calls"]] * 6
        assert b.flops.tolist() == pytest.approx([plan["flops"]] * 6)
    assert max(spent["nfe"]) <= limits.get("nfe", 1e9) and max(spent["flops"]) <= limits.get("flops", 1e18) * (1 + 1e-12)
    if name != "ttsnap":  # one reward price: FLOPs = NFEs x 10 + calls x (3 + decode)
        assert torch.allclose(b.flops, b.nfe.double() * 10.0 + b.reward_calls.double() * (3.0 + decode))
    else:  # prune calls at 5 + decode, the final call (one per survivor) at 3 + decode
        survivors = result.info["alive"][-1]
        prune_calls = b.reward_calls.double() - survivors
        expected = b.nfe.double() * 10.0 + prune_calls * (5.0 + decode) + survivors * (3.0 + decode)
        assert torch.allclose(b.flops, expected)


@pytest.mark.parametrize("name,opts", CASES, ids=IDS)
@pytest.mark.parametrize("sampler", ["euler-ancestral", "heun"])
def test_stays_within_nfe_budget(name, opts, sampler):
    limits = (167, 251) if sampler == "euler-ancestral" else (181,)  # not multiples of any natural unit
    for limit in limits:
        problem, result = run(name, opts, nfe=limit, sampler=sampler, n=16)
        b = problem.budget
        assert int(b.nfe.max()) <= limit
        assert result.x0.shape == (16, 1, 2, 2) and result.rewards.shape == (16,)
        json.dumps(result.info)  # goes into report.json
        if name != "naive":  # the strategies fill their budget (within one unit of their size)
            assert int(b.nfe.min()) > limit / 2


@pytest.mark.parametrize("name,opts", CASES, ids=IDS)
def test_stays_within_flop_budget(name, opts):
    # 10 FLOPs per NFE, 3 per reward call: reward calls matter for the plan
    limit = 2500.0
    problem, _ = run(name, opts, flops=limit, n=16)
    b = problem.budget
    assert float(b.flops.max()) <= limit
    if name != "ttsnap":  # ttsnap's prune reward has its own price (test_plan_equals_spend)
        assert torch.allclose(b.flops, b.nfe.double() * 10.0 + b.reward_calls.double() * 3.0)
    if name != "naive":
        assert float(b.flops.min()) > limit / 2


@pytest.mark.parametrize("name,opts", CASES, ids=IDS)
def test_seed_reproduces(name, opts):
    # a small budget, so that the searches do not all converge to the exact target point (beam spends
    # what its beam leaves on extra candidates: at 80 NFEs every search finds the target)
    nfe = 52 if name == "beam" else 80
    _, a = run(name, opts, nfe=nfe, seed=7)
    _, b = run(name, opts, nfe=nfe, seed=7)
    _, c = run(name, opts, nfe=nfe, seed=8)
    assert torch.equal(a.x0, b.x0) and torch.equal(a.rewards, b.rewards)
    assert a.info == b.info
    assert not torch.equal(a.x0, c.x0)


@pytest.mark.parametrize("name,opts", [c for c in CASES if c[0] != "naive"], ids=[i for c, i in zip(CASES, IDS) if c[0] != "naive"])
def test_improves_over_naive_on_known_answer(name, opts):
    budget = 300  # 25 trajectories' worth
    _, naive = run("naive", {}, nfe=budget, seed=1)
    _, res = run(name, opts, nfe=budget, seed=1)
    hit_naive = float((naive.rewards > -0.01).float().mean())
    hit = float((res.rewards > -0.01).float().mean())
    assert float(res.rewards.mean()) > float(naive.rewards.mean()) + 0.2, (res.rewards.mean(), naive.rewards.mean())
    assert hit > hit_naive + 0.15, (hit, hit_naive)
    # the rewards reported are those of the returned samples
    problem = make_problem(nfe=1)
    rescored = ModeReward(problem.sampler.denoiser)(problem.sampler.denoiser.decode(res.x0), problem.prompts)
    assert torch.allclose(rescored, res.rewards, atol=1e-5)


@pytest.mark.parametrize("name,opts", CASES, ids=IDS)
def test_budget_below_one_trajectory_raises(name, opts):
    problem = make_problem(nfe=STEPS - 1)
    with pytest.raises(BudgetError) as err:
        strategy(name, opts).search(problem)
    assert isinstance(err.value, NoiseSearchError) and "budget" in str(err.value)
    assert int(problem.budget.nfe.max()) == 0  # refused before spending anything


@pytest.mark.parametrize("name,opts", [("eps-greedy", {"iterations": 5, "n_candidates": 4, "score_every": 1}),
                                       ("beam", {"beams": 4, "n_candidates": 4, "score_every": 1}),
                                       ("mcts", {"simulations": 3, "score_every": 1}), ("smc", {"particles": 20})])
def test_explicit_size_over_budget_raises_before_spending(name, opts):
    # every knob fixed by the user: nothing left for the sizer to shrink
    problem = make_problem(nfe=150)
    with pytest.raises(BudgetError, match="budget too small"):
        make_strategy(name, **opts).search(problem)
    assert int(problem.budget.nfe.max()) == 0


def test_eps_greedy_fits_k_and_batches_every_step():
    # 12 steps, N = 4, initial noise searched: exactly 48 NFEs per iteration per step
    problem = make_problem(nfe=48 * 3 + 10)
    calls = []
    problem.sampler.on_call = calls.append
    result = make_strategy("eps-greedy", search_init=True).search(problem)
    # K = 3 everywhere, and the leftover 10 NFEs buy one more iteration at the first two levels
    assert result.info["iterations_per_step"] == [4, 4] + [3] * 10
    assert int(problem.budget.nfe.max()) == 152 == int(problem.budget.nfe.min())
    assert calls == [P * 4] * (12 * 3 + 2)  # every call: all candidates of all searches
    # the paper's window: K iterations only where 0.01 <= sigma <= 1, one elsewhere
    s = problem.sampler
    problem = make_problem(nfe=48 * 3)
    result = make_strategy("eps-greedy", sigma_window=(0.01, 1.0), search_init=True).search(problem)
    ks = result.info["iterations_per_step"]
    sig = [float(s.sigmas[0])] + [float(s.sigmas[i]) for i in range(11)]
    assert all(k == 1 for k, x in zip(ks, sig) if not 0.01 <= x <= 1) and max(ks) > 3
    assert int(problem.budget.nfe.max()) <= 144


def test_eps_greedy_elitist_never_worse_than_first_iteration():
    # with eps = 1 both variants draw the same candidates; the elitist pivot's reward is the running max
    _, paper = run("eps-greedy", {"eps": 1.0, "iterations": 4}, nfe=48 * 4)
    _, elite = run("eps-greedy", {"eps": 1.0, "iterations": 4, "elitist": True}, nfe=48 * 4)
    assert paper.info["pivot_replaced_by_worse"] > 0 and elite.info["pivot_replaced_by_worse"] == 0
    assert float(elite.rewards.mean()) >= float(paper.rewards.mean())


def test_eps_greedy_options_validated():
    problem = make_problem(nfe=100)
    for opts in ({"eps": 1.5}, {"n_candidates": -1}, {"score_every": -1}, {"sigma_window": (1.0,)}, {"radius": -1.0}):
        with pytest.raises(NoiseSearchError):
            make_strategy("eps-greedy", **opts).search(problem)
    with pytest.raises(NoiseSearchError):
        make_strategy("smc", potential="nope").search(problem)


@pytest.mark.parametrize("name,opts", [("beam", {"beams": 3}), ("smc", {"particles": 6}), ("eps-greedy", {"n_candidates": 5}),
                                       ("best-of-n", {}), ("ttsp", {})])
def test_comparative_reward_does_not_depend_on_max_batch(name, opts):
    # a rank sum compares the candidates of one search, whatever chunks the rows were scored in
    from noisesearch.rewards.base import RankSum

    chosen = []
    for max_batch in (512, 13, 5):
        problem = make_problem(nfe=200, n=10, max_batch=max_batch)
        problem.reward = RankSum([problem.reward, PruneModeReward(problem.denoiser)])
        problem.budget.cost = problem.budget.cost.__class__(10.0, problem.reward.flops_per_image, 0.0)
        res = strategy(name, opts).search(problem)
        chosen.append(res)
    for other in chosen[1:]:
        assert torch.allclose(other.x0, chosen[0].x0, atol=1e-5)
        # rank sums are whole numbers (ranks among one search's candidates), so exact equality holds
        # whatever the batch shape: compare them as integers, not as floats
        assert other.rewards.round().long().tolist() == chosen[0].rewards.round().long().tolist()
        assert torch.equal(other.rewards, other.rewards.round())


@pytest.mark.parametrize(
    "name,opts",
    [("eps-greedy", {"n_candidates": 1, "iterations": 1}), ("zero-order", {"n_candidates": 1, "iterations": 1}),
     ("beam", {"beams": 3, "n_candidates": 1}), ("smc", {"particles": 1})],
)
def test_no_reward_calls_without_a_choice(name, opts):
    # one candidate per decision: nothing to choose, so only the final images are scored, and the
    # result is exactly the run that scores everything (same noise draws)
    problem = make_problem(nfe=100, n=8)
    result = strategy(name, opts).search(problem)
    keep = opts.get("beams", 1)
    assert problem.budget.reward_calls.tolist() == [keep] * 8
    assert problem.budget.nfe.tolist() == [STEPS * keep] * 8
    # with FLOPs budgets the saved reward calls buy nothing here, but are not charged either
    problem2 = make_problem(flops=float(STEPS * keep * 10 + keep * 3), n=8)
    result2 = strategy(name, opts).search(problem2)
    assert torch.equal(result.x0, result2.x0)
    assert float(problem2.budget.flops.max()) == STEPS * keep * 10 + keep * 3
    if name in ("eps-greedy", "zero-order"):  # a lone candidate is one fresh noise: naive sampling
        assert torch.equal(result.x0, strategy("naive", {}).search(make_problem(nfe=100, n=8)).x0)


def test_mcts_finds_the_mode_with_many_simulations():
    # with enough simulations per step MCTS is a near-exhaustive search of its 4-ary tree
    _, res = run("mcts", {"simulations": 10}, nfe=3000, n=12)
    assert float((res.rewards > -0.01).float().mean()) >= 0.75


def test_resample_indices():
    g = NoiseSource(0, (1,), [(0, 0), (1, 0), (2, 0)])
    log_w = torch.tensor([[0.0, -1e9, -1e9], [-1e9, -1e9, 0.0], [0.0, 0.0, 0.0]])
    for method in ("systematic", "multinomial"):
        idx = resample_indices(log_w, g, method)
        assert idx[0].tolist() == [0, 0, 0] and idx[1].tolist() == [2, 2, 2]
    assert sorted(resample_indices(log_w, g, "systematic")[2].tolist()) == [0, 1, 2]


def test_api_records_params_and_info(tmp_path):
    from noisesearch import api

    den = toy_denoiser()
    run_ = api.generate(model=den, prompts=["3", "5"], reward=ModeReward(den), strategy="eps-greedy", budget_nfe=100, num_samples=3, steps=STEPS, strategy_options={"radius": 0.3, "elitist": True}, seed=4)
    api.save_run(run_, tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["params"]["radius"] == 0.3 and report["params"]["elitist"] is True
    assert report["params"]["eps"] == 0.4 and report["params"]["n_candidates"] == 0  # 0: chosen with the size
    assert report["strategy_info"]["configuration"] == {"n_candidates": 4, "score_every": 1}
    assert report["strategy_info"]["iterations_total"] == 2 * 11 + 2 and report["nfe_max"] <= 100


def _digits_available() -> bool:
    try:
        from noisesearch.models.digits import DENOISER_FILE, WEIGHTS_DIR
        from noisesearch.rewards.digit import CLASSIFIER_FILE, JUDGE_FILE
    except ImportError:
        return False
    return all((Path(WEIGHTS_DIR) / f).is_file() for f in (DENOISER_FILE, CLASSIFIER_FILE, JUDGE_FILE))


@pytest.mark.skipif(not _digits_available(), reason="digits weights not built")
@pytest.mark.parametrize("strategy,flags", [("eps-greedy", ["--radius", "0.2", "--elitist", "true", "--sigma-window", "0.01,1"]), ("smc", ["--potential", "max"]), ("mcts", ["--simulations", "1", "--c-uct", "2.0"])])
def test_cli_records_params(tmp_path, strategy, flags):
    from noisesearch.cli import main

    out = tmp_path / strategy
    argv = ["generate", "--model", "digits", "--guidance", "0", "--prompt", "3", "--reward", "digit", "--strategy", strategy, "--budget-nfe", "200", "--num-samples", "2", "--seed", "1", "--device", "cpu", "--no-progress", "--quiet", "--out", str(out)] + flags
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["strategy"] == strategy and report["nfe_max"] <= 200
    params = report["params"]
    for flag, value in zip(flags[::2], flags[1::2]):
        key = flag[2:].replace("-", "_")
        got = params[key]
        if isinstance(got, bool):
            assert got is (value == "true")
        elif isinstance(got, (list, tuple)):
            assert [float(v) for v in got] == [float(v) for v in value.split(",")]
        else:
            assert got == type(got)(value)
    assert report["strategy_info"] and 0.0 <= report["judge_accuracy"] <= 1.0


def test_score_batch_chunks_decode_and_reward_apart_from_the_denoiser():
    problem = make_problem(nfe=120, n=10, max_batch=512)
    problem.score_batch = 7
    sizes = []
    reward = problem.reward

    class Spy:
        name, flops_per_image = reward.name, reward.flops_per_image

        def __call__(self, images, prompts):
            sizes.append(len(prompts))
            return reward(images, prompts)

    problem.reward = Spy()
    result = make_strategy("best-of-n").search(problem)
    assert max(sizes) == 7 and sum(sizes) == int(problem.budget.reward_calls.sum())
    again = make_problem(nfe=120, n=10, max_batch=512)
    torch.testing.assert_close(make_strategy("best-of-n").search(again).x0, result.x0)
