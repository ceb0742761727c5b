"""Naive sampling and best-of-N (random search over the initial noise)."""
from __future__ import annotations

from dataclasses import dataclass

from noisesearch.budget import Cost
from noisesearch.errors import NoiseSearchError
from noisesearch.search.base import Problem, SearchResult, Strategy, best_per_owner


@dataclass
class Naive(Strategy):
    """One sample per search, no selection (the baseline every method is compared with)."""

    name = "naive"

    def describe(self, size: int) -> str:
        return "one sample"

    def cost(self, problem: Problem, size: int) -> Cost:
        return problem.nfe_cost(problem.sampler.nfe_per_trajectory) + problem.score_cost(1)

    def run(self, problem: Problem, size: int) -> SearchResult:
        state = problem.rollout(problem.start(1))
        return SearchResult(x0=state.x0, rewards=problem.score(state), info={"candidates": 1})


@dataclass
class BestOfN(Strategy):
    """Draw N full trajectories per search, keep the one with the highest final reward.

    ``n_candidates = 0`` (default) uses as many as the budget affords: one trajectory costs
    ``sampler.nfe_per_trajectory`` NFEs plus one reward call.
    """

    name = "best-of-n"
    size_option = "n_candidates"
    n_candidates: int = 0  # N: candidates per search, the best final sample is kept; 0 = fit to the budget

    def validate(self) -> None:
        if self.n_candidates < 0:
            raise NoiseSearchError("--n-candidates must be >= 0 (0 = fit to the budget)")

    def describe(self, size: int) -> str:
        return "one sample" if size == 1 else f"best-of-{size}"

    def cost(self, problem: Problem, size: int) -> Cost:
        return size * (problem.nfe_cost(problem.sampler.nfe_per_trajectory) + problem.score_cost(1))

    def run(self, problem: Problem, size: int) -> SearchResult:
        state = problem.rollout(problem.start(size))
        rewards = problem.score(state)
        best = best_per_owner(rewards, state.owner, problem.num_searches)
        return SearchResult(
            x0=state.x0[best.to(state.x0.device)],
            rewards=rewards[best],
            info={"candidates": size, "all_rewards": rewards.view(problem.num_searches, size).tolist()},
        )
