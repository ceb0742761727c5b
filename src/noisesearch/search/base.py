"""What every strategy works with: a ``Problem`` (sampler, reward, budget, prompts, generator)
and the ``SearchResult`` it returns.

A problem holds ``P`` independent searches, one per output sample (prompt i repeated
``num_samples`` times gives P = prompts x samples). Strategies batch all candidates of all searches
into one ``State``; ``state.owner`` maps each row to its search, so that scoring and budgeting are
per search. Strategies are dataclasses (their fields are their hyperparameters) with a class
attribute ``name`` and a method ``search(problem) -> SearchResult``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch

from noisesearch.budget import Budget
from noisesearch.errors import BudgetError, NoiseSearchError
from noisesearch.models.base import Cond, cond_repeat
from noisesearch.rewards.base import Reward, score
from noisesearch.sampling.samplers import Sampler, State


@dataclass
class Problem:
    sampler: Sampler
    reward: Reward
    budget: Budget
    prompts: list[str]  # one per search
    cond: Cond  # batched, one row per search
    generator: torch.Generator

    @property
    def num_searches(self) -> int:
        return len(self.prompts)

    # ---- building blocks strategies share --------------------------------------------------------
    def start(self, n: int, noise: torch.Tensor | None = None) -> State:
        """``n`` fresh candidates per search (rows grouped by search: search i -> rows i*n..i*n+n-1)."""
        rows = self.num_searches * n
        if noise is None:
            noise = self.sampler.noise(rows, self.generator)
        owner = torch.arange(self.num_searches).repeat_interleave(n)
        return self.sampler.start(cond_repeat(self.cond, n), noise, owner)

    def score(self, state: State) -> torch.Tensor:
        """Reward of each row's Tweedie estimate x0, charged to the budget. Float32 [B] on the CPU.

        Scored in chunks of about ``sampler.max_batch`` rows (big reward batches are slower per
        image on a CPU and may not fit in GPU memory). When the rows are grouped by search with
        equal counts, chunks hold whole searches, so that rewards that are only comparable within
        one call (``ranksum``) still compare the candidates of a search with each other."""
        n, mb = len(state), max(1, self.sampler.max_batch)
        if n <= mb:
            return self._score(state)
        per = n // self.num_searches if n % self.num_searches == 0 else 1
        step = max(per, mb // per * per)
        return torch.cat([self._score(state.select(torch.arange(lo, min(lo + step, n)))) for lo in range(0, n, step)])

    def _score(self, state: State) -> torch.Tensor:
        self.budget.charge_reward(state.owner)
        images = self.sampler.denoiser.decode(state.x0)
        prompts = [self.prompts[i] for i in state.owner.tolist()]
        return score(self.reward, images, prompts)

    def images(self, state: State) -> torch.Tensor:
        return self.sampler.denoiser.decode(state.x0)

    def check_affords(self, what: str, nfe: float, reward_calls: float = 0) -> None:
        """Raise a clear BudgetError if one search cannot afford ``nfe`` NFEs (+ reward calls)."""
        if not self.budget.affords(nfe, reward_calls):
            limit = []
            if self.budget.nfe_limit is not None:
                limit.append(f"{self.budget.nfe_limit:g} NFEs")
            if self.budget.flops_limit is not None:
                limit.append(f"{self.budget.flops_limit:.4g} FLOPs")
            need = self.budget.cost.flops(nfe, reward_calls)
            raise BudgetError(
                f"budget too small: {what} needs {nfe:g} NFEs"
                + (f" ({need:.4g} FLOPs)" if self.budget.flops_limit is not None else "")
                + f" per sample, the budget allows {' and '.join(limit)}; "
                f"raise the budget to at least {nfe:g} NFEs per sample"
            )


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
    return [i for i in range(sampler.num_steps) if sampler.uses_noise(i)]


def fit_count(problem: Problem, cost, what: str, start: int = 1) -> int:
    """Largest ``n >= start`` with ``problem.budget.affords(*cost(n))`` (``cost(n) -> (nfe, calls)``,
    non-decreasing in ``n``). Raises a clear BudgetError when even ``n = start`` does not fit."""
    nfe, calls = cost(start)
    problem.check_affords(what(start) if callable(what) else what, nfe, calls)
    lo, hi = start, start + 1
    while problem.budget.affords(*cost(hi)):  # exponential search, then bisection
        lo, hi = hi, 2 * hi
        if hi > 1 << 40:
            raise NoiseSearchError("the budget does not constrain this search; give its size explicitly")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if problem.budget.affords(*cost(mid)):
            lo = mid
        else:
            hi = mid
    return lo


def advance(sampler: Sampler, state: State) -> State:
    """Take the deterministic steps (those that inject no noise) up to the next decision point."""
    while state.step < sampler.num_steps and not sampler.uses_noise(state.step):
        state = sampler.step(state, None)
    return state


def nfe_between(sampler: Sampler, i: int, j: int) -> int:
    """Network calls per row from step ``i`` to step ``j``."""
    return sum(sampler.step_nfe(k) for k in range(i, j))


def deterministic_nfe(sampler: Sampler) -> int:
    """Network calls per row of the steps that inject no noise (taken once per kept row)."""
    return sum(sampler.step_nfe(i) for i in range(sampler.num_steps) if not sampler.uses_noise(i))


@dataclass
class SearchResult:
    """Chosen sample per search, its reward, and whatever the strategy wants to report."""

    x0: torch.Tensor  # [P, *sample_shape]
    rewards: torch.Tensor  # [P] reward of the chosen final sample
    info: dict[str, Any] = field(default_factory=dict)


class Strategy:
    """Base class for search strategies (subclasses are dataclasses of hyperparameters)."""

    name: ClassVar[str] = "strategy"

    def search(self, problem: Problem) -> SearchResult:
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}

    @classmethod
    def options(cls) -> Sequence[dataclasses.Field]:
        return dataclasses.fields(cls) if dataclasses.is_dataclass(cls) else ()
