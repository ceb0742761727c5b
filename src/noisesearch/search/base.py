"""What every strategy works with: a ``Problem`` (sampler, reward, budget, prompts, noise source)
and the ``SearchResult`` it returns; the ``Strategy`` base that sizes a search to its budget.

A problem holds ``P`` independent searches, one per output sample (prompt i repeated
``num_samples`` times gives P = prompts x samples). Strategies batch all candidates of all searches
into one ``State``; ``state.owner`` maps each row to its search, so that scoring, budgeting and
noise are per search.

The problem executes and accounts, the strategy proposes (Optuna's split of sampler and study):

* every noise comes from ``problem.noise`` (one stream per search, :mod:`noisesearch.noise`);
* every network evaluation is charged by the sampler, every reward call by :meth:`Problem.score`
  (decode of the estimate included), both through ``Budget.charge``;
* a strategy states what a size costs (:meth:`Strategy.cost`) and runs at a size
  (:meth:`Strategy.run`); :meth:`Strategy.search` fits the size to the budget and checks after
  the run that every search spent exactly what was planned;
* a strategy with several knobs (candidates per decision, which decisions are scored) lists the
  configurations it may run as (:meth:`Strategy.configurations`, its own first); the sizer
  (``Budget.fit_options``) picks one and its size for the budget and the reward's price.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch

from noisesearch.budget import Budget, Cost, SizeOption
from noisesearch.models.base import Cond, cond_index, cond_repeat
from noisesearch.noise import NoiseSource
from noisesearch.rewards.base import Reward, at_step, is_comparative, score
from noisesearch.sampling.samplers import Sampler, State
from noisesearch.search.trace import thumbnails


@dataclass
class Problem:
    sampler: Sampler
    reward: Reward
    budget: Budget
    prompts: list[str]  # one per search
    cond: Cond  # batched, one row per search
    noise: NoiseSource  # one stream per search
    score_batch: int | None = None  # rows decoded + scored per chunk (default: the sampler's max_batch)
    trace: Any = None  # a search.trace.SearchTrace recording every scored batch (None: off, no cost)

    @property
    def num_searches(self) -> int:
        return len(self.prompts)

    @property
    def denoiser(self):
        return self.sampler.denoiser

    # ---- costs (per search) ----------------------------------------------------------------------
    def nfe_cost(self, n: int) -> Cost:
        """``n`` network evaluations."""
        return self.budget.cost.nfe(n)

    def score_cost(self, n: int, reward: Reward | None = None) -> Cost:
        """``n`` reward calls of ``reward`` (default: the problem's), each with its decode."""
        return self.budget.cost.reward(n, None if reward is None else float(reward.flops_per_image))

    # ---- building blocks strategies share --------------------------------------------------------
    def start(self, n: int, noise: torch.Tensor | None = None) -> State:
        """``n`` fresh candidates per search (rows grouped by search: search i -> rows i*n..i*n+n-1)."""
        owner = torch.arange(self.num_searches).repeat_interleave(n)
        if noise is None:
            noise = self.noise.normal(owner)
        return self.sampler.start(cond_repeat(self.cond, n), noise, owner)

    def cond_rows(self, searches: torch.Tensor) -> Cond:
        """The condition of each listed search (one row each)."""
        return cond_index(self.cond, searches)

    def rollout(self, state: State, until: int | None = None) -> State:
        """Continue every row with fresh noise from its search's stream."""
        return self.sampler.rollout(state, self.noise, until)

    def score(self, state: State, reward: Reward | None = None, step: int | None = None,
              sigma: float | None = None) -> torch.Tensor:
        """Reward of each row's Tweedie estimate x0, charged first (one reward call per row, decode
        included). Float32 [B] on the CPU.

        ``reward`` defaults to the problem's; ``step``/``sigma`` tell noise-aware rewards where the
        estimates come from. Decoding and scoring run in chunks of ``score_batch`` rows (default
        ``sampler.max_batch``: on a GPU the VAE and the reward may need smaller chunks); a
        reward that compares candidates (``ranksum``) compares the rows of each search, after all
        chunks are scored, so the result does not depend on the chunk size."""
        reward = self.reward if reward is None else reward
        main = reward is self.reward
        self.budget.charge(state.owner, self.score_cost(1, reward), "reward")
        reward = at_step(reward, step, sigma)
        comparative = is_comparative(reward)
        parts = list(reward.rewards) if comparative else [reward]
        prompts = [self.prompts[i] for i in state.owner.tolist()]
        n, mb = len(state), max(1, self.score_batch or self.sampler.max_batch)
        values: list[list[torch.Tensor]] = [[] for _ in parts]
        thumbs = []
        for lo in range(0, n, mb):
            images = self.denoiser.decode(state.x0[lo : lo + mb])
            for v, r in zip(values, parts):
                v.append(score(r, images, prompts[lo : lo + mb]))
            if self.trace is not None:
                thumbs.append(thumbnails(images))
        values = [torch.cat(v) if len(v) > 1 else v[0] for v in values]
        out = reward.combine(values, state.owner) if comparative else values[0]
        if self.trace is not None:
            self.trace.record(state.step, sigma, main, state.owner, out, torch.cat(thumbs))
        return out


def best_per_owner(values: torch.Tensor, owner: torch.Tensor, num_owners: int) -> torch.Tensor:
    """Row index of the highest value of each owner (first on ties). Long [num_owners]."""
    values = values.double()
    owner = owner.long()
    best = torch.full((num_owners,), float("-inf"), dtype=torch.float64).scatter_reduce(0, owner, values, "amax")
    rows = torch.arange(values.numel())
    big = torch.full_like(rows, values.numel())
    candidates = torch.where(values == best[owner], rows, big)
    out = torch.full((num_owners,), values.numel(), dtype=torch.long).scatter_reduce(0, owner, candidates, "amin")
    if (out >= values.numel()).any():
        raise RuntimeError("a search has no candidates left")
    return out


def topk_per_owner(values: torch.Tensor, owner: torch.Tensor, k: int) -> torch.Tensor:
    """Row indices of the ``k`` highest values of each owner (rows grouped contiguously by owner,
    every owner with the same number of rows). Long [num_owners * k], grouped by owner."""
    n_owners = int(owner.max()) + 1
    per = values.numel() // n_owners
    v = values.view(n_owners, per)
    if not torch.equal(owner.view(n_owners, per), torch.arange(n_owners).view(-1, 1).expand(-1, per)):
        raise ValueError("topk_per_owner needs rows grouped by owner with equal counts")
    idx = torch.topk(v.double(), k, dim=1, sorted=True).indices
    return (idx + torch.arange(n_owners).view(-1, 1) * per).flatten()


# ---- planning helpers shared by the trajectory searches (eps-greedy, beam, SMC, MCTS) -------
def noise_steps(sampler: Sampler) -> list[int]:
    """Steps whose injected noise matters (the decision points of a trajectory search)."""
    return sampler.noise_steps()


def advance(sampler: Sampler, state: State) -> State:
    """Take the deterministic steps (those that inject no noise) up to the next decision point."""
    while state.step < sampler.num_steps and not sampler.uses_noise(state.step):
        state = sampler.step(state, None)
    return state


def nfe_between(sampler: Sampler, i: int, j: int) -> int:
    """Network calls per row from step ``i`` to step ``j``."""
    return sum(sampler.step_nfe(k) for k in range(i, j))


def scored_decision(i: int, every: int) -> bool:
    """Whether decision ``i`` is scored when every ``every``-th decision is: decision 0 is the initial
    noise (or the state at ``sigma_0``), decision ``d >= 1`` the noise of the ``d``-th noise step.
    ``every = 1`` scores them all; otherwise decisions 1, 1 + every, 1 + 2 every, ... (the first noise
    step always: on a class-level reward the early steps decide most)."""
    return every <= 1 or (i >= 1 and (i - 1) % every == 0)


def deterministic_nfe(sampler: Sampler) -> int:
    """Network calls per row of the steps that inject no noise (taken once per kept row)."""
    noisy = set(sampler.noise_steps())
    return sum(sampler.step_nfe(i) for i in range(sampler.num_steps) if i not in noisy)


@dataclass
class SearchResult:
    """Chosen sample per search, its reward, and whatever the strategy wants to report."""

    x0: torch.Tensor  # [P, *sample_shape]
    rewards: torch.Tensor  # [P] reward of the chosen final sample
    info: dict[str, Any] = field(default_factory=dict)


class Strategy:
    """Base class for search strategies (subclasses are dataclasses of hyperparameters).

    A subclass says what one search costs at a size (:meth:`cost`) and runs at a size (:meth:`run`).
    ``size_option`` names the hyperparameter that sets the size; 0 there means "fit to the budget":
    the largest size whose cost the budget affords (``Budget.fit``). Other knobs left at 0 ("fit") are
    chosen by :meth:`configurations`, the concrete variants the sizer picks from (``Budget.fit_options``:
    the affordable configuration nearest the strategy's own, then its largest size). ``leftover_option``
    names a knob, 0 meaning "what the fitted size leaves", that :meth:`plan` then sets to the most the
    rest of the budget affords, unless the user gave it or one of ``leftover_unless`` (the sizes they
    fixed). ``plan_is_exact`` is False only where the spend depends on the data (MCTS: a rollout from
    a deeper leaf is cheaper), and the plan is then the worst case.
    """

    name: ClassVar[str] = "strategy"
    size_option: ClassVar[str | None] = None
    leftover_option: ClassVar[str | None] = None
    leftover_unless: ClassVar[tuple[str, ...]] = ()
    plan_is_exact: ClassVar[bool] = True

    # -- what subclasses provide --
    def validate(self) -> None:
        """Refuse bad hyperparameters (NoiseSearchError) before any work."""

    def cost(self, problem: Problem, size: int) -> Cost:
        raise NotImplementedError

    def run(self, problem: Problem, size: int) -> "SearchResult":
        raise NotImplementedError

    def describe(self, size: int) -> str:
        return f"{self.name} with {self.size_option or 'size'} {size}"

    def requested_size(self, problem: Problem) -> int | None:
        """The size the user fixed, or None to fit it to the budget."""
        if self.size_option is None:
            return 1
        return int(getattr(self, self.size_option)) or None

    def min_size(self, problem: Problem) -> int:
        """The smallest meaningful size (the fit starts there)."""
        return 1

    def max_size(self, problem: Problem) -> int | None:
        """A cap on the fitted size (None: the budget alone decides)."""
        return None

    def configurations(self, problem: Problem) -> list[tuple["Strategy", int]]:
        """The concrete configurations (every knob fixed but the size), each with its smallest size,
        that the sizer may choose from, the strategy's own (the most expensive) first. Default: the
        strategy itself from :meth:`min_size`."""
        return [(self, self.min_size(problem))]

    def exact_plan(self, problem: Problem) -> bool:
        """Whether the spend must equal the plan (False: the plan is a worst case); ``plan_is_exact``."""
        return self.plan_is_exact

    def knobs(self) -> dict[str, Any]:
        """The knobs a configuration fixed (reported as ``strategy_info.configuration``)."""
        return {}

    # -- shared --
    def plan(self, problem: Problem) -> tuple["Strategy", int]:
        """The configuration and size to run: the one sizing rule, ``Budget.fit_options``; then the
        ``leftover_option`` the rest of the budget affords (where it applies: the class docstring)."""
        configs = self.configurations(problem)
        options = [SizeOption(lambda n, c=c: c.cost(problem, n), start, c.requested_size(problem), c.max_size(problem))
                   for c, start in configs]
        index, size = problem.budget.fit_options(options, lambda i, n: configs[i][0].describe(n))
        config, knob = configs[index][0], self.leftover_option
        if knob is None or any(getattr(self, k) for k in (knob, *self.leftover_unless)):  # given: as it is
            return config, size
        extra = problem.budget.fit(lambda e: dataclasses.replace(config, **{knob: e}).cost(problem, size), 0)
        return dataclasses.replace(config, **{knob: extra}), size

    def size_for(self, problem: Problem) -> int:
        """The size this configuration runs at (the sizer's choice among :meth:`configurations`)."""
        return self.plan(problem)[1]

    def search(self, problem: Problem) -> "SearchResult":
        self.validate()
        config, size = self.plan(problem)
        planned = config.cost(problem, size)
        problem.budget.require(planned, config.describe(size))
        before = problem.budget.snapshot()
        result = config.run(problem, size)
        problem.budget.check_spent(before, planned, exact=config.exact_plan(problem))
        result.info["planned_per_sample"] = planned.as_dict()
        if config.knobs():
            result.info["configuration"] = config.knobs()
        return result

    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}

    @classmethod
    def options(cls) -> Sequence[dataclasses.Field]:
        return dataclasses.fields(cls) if dataclasses.is_dataclass(cls) else ()
