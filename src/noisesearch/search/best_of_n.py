"""Naive sampling and best-of-N (random search over the initial noise)."""
from __future__ import annotations

from dataclasses import dataclass

from noisesearch.search.base import Problem, SearchResult, Strategy, best_per_owner


@dataclass
class Naive(Strategy):
    """One sample per search, no selection (the baseline every method is compared with)."""

    name = "naive"

    def search(self, problem: Problem) -> SearchResult:
        s = problem.sampler
        problem.check_affords("one sample", s.nfe_per_trajectory, 1)
        state = s.rollout(problem.start(1), problem.generator)
        rewards = problem.score(state)
        return SearchResult(x0=state.x0, rewards=rewards, info={"candidates": 1})


@dataclass
class BestOfN(Strategy):
    """Draw N full trajectories per search, keep the one with the highest final reward.

    ``n_candidates = 0`` (default) uses as many as the budget affords: one trajectory costs
    ``sampler.nfe_per_trajectory`` NFEs plus one reward call.
    """

    name = "best-of-n"
    n_candidates: int = 0

    def search(self, problem: Problem) -> SearchResult:
        s = problem.sampler
        nfe, calls = s.nfe_per_trajectory, 1
        problem.check_affords("one sample", nfe, calls)
        n = self.n_candidates or problem.budget.max_count(nfe, calls)
        problem.check_affords(f"best-of-{n}", n * nfe, n * calls)
        state = s.rollout(problem.start(n), problem.generator)
        rewards = problem.score(state)
        best = best_per_owner(rewards, state.owner, problem.num_searches)
        return SearchResult(
            x0=state.x0[best],
            rewards=rewards[best],
            info={"candidates": n, "all_rewards": rewards.view(problem.num_searches, n).tolist()},
        )
