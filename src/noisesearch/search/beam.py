"""Beam search over noise trajectories.

Each search keeps ``B`` beams (partial trajectories). At every step that injects noise, each beam is
branched into ``N`` candidates with fresh Gaussian noises (``B * N`` rows per search, all searches in
one network call), every candidate is scored by the reward of its Tweedie estimate, and the best
``B`` of the ``B * N`` are kept (``topk_per_owner``; several may share a parent). The initial noise
is searched the same way: ``B * N`` starts, the best ``B`` kept. At the end the beam with the
highest final reward is returned.

Budget: ``beams=0`` (default) fits ``B`` to the budget. The cost per search is ``B * N`` candidates
per searched level (``sampler.step_nfe`` NFEs and one reward call each), ``B`` rows through the
steps that inject no noise, and ``B`` final reward calls: with 18 Euler-ancestral steps it is
``18 * B * N`` NFEs. With ``N = 1`` every candidate is kept, so nothing is scored but the final
images. ``B = 1`` is greedy (the best of ``N`` fresh noises at every step).
"""
from __future__ import annotations

from dataclasses import dataclass

from noisesearch.budget import Cost
from noisesearch.errors import NoiseSearchError
from noisesearch.sampling.samplers import State
from noisesearch.search.base import (
    Problem,
    SearchResult,
    Strategy,
    advance,
    best_per_owner,
    deterministic_nfe,
    noise_steps,
    topk_per_owner,
)


@dataclass
class Beam(Strategy):
    """Beam search: ``beams`` beams x ``n_candidates`` fresh noises, keep the best by Tweedie reward."""

    name = "beam"
    size_option = "beams"
    beams: int = 0  # B: beams kept per search; 0 = fit to the budget
    n_candidates: int = 4  # N: candidate noises per beam at every step

    def validate(self) -> None:
        if self.n_candidates < 1:
            raise NoiseSearchError("--n-candidates must be at least 1")
        if self.beams < 0:
            raise NoiseSearchError("--beams must be >= 0 (0 = fit to the budget)")

    def describe(self, size: int) -> str:
        return f"beam search with {size} beam(s) x {self.n_candidates} candidates"

    def cost(self, problem: Problem, size: int) -> Cost:
        s, b, n = problem.sampler, size, self.n_candidates
        levels = len(noise_steps(s)) + 1  # + the initial noise
        nfe = b * n * s.start_nfe + sum(b * n * s.step_nfe(i) for i in noise_steps(s)) + b * deterministic_nfe(s)
        scored = levels * b * n if n > 1 else 0  # with N = 1 every candidate is kept: no scoring
        return problem.nfe_cost(nfe) + problem.score_cost(scored + b)

    def keep_best(self, problem: Problem, candidates: State, beams: int) -> State:
        """The ``beams`` best candidates of each search by the reward of their Tweedie estimates."""
        if self.n_candidates == 1:  # every candidate is kept: nothing to score
            return candidates
        return candidates.select(topk_per_owner(problem.score(candidates), candidates.owner, beams))

    def run(self, problem: Problem, size: int) -> SearchResult:
        s, N = problem.sampler, self.n_candidates
        state = self.keep_best(problem, problem.start(size * N), size)
        steps = 0
        while True:
            state = advance(s, state)
            if state.step >= s.num_steps:
                break
            branches = state.repeat(N)
            state = self.keep_best(problem, s.step(branches, problem.noise.normal(branches.owner)), size)
            steps += 1
        rewards = problem.score(state)
        best = best_per_owner(rewards, state.owner, problem.num_searches)
        return SearchResult(
            x0=state.x0[best.to(state.x0.device)],
            rewards=rewards[best],
            info={"beams": size, "n_candidates": N, "searched_steps": steps + 1},
        )


__all__ = ["Beam"]
