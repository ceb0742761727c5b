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

from noisesearch.errors import NoiseSearchError
from noisesearch.search.base import Problem, SearchResult, Strategy, best_per_owner, topk_per_owner, advance, deterministic_nfe, fit_count, noise_steps


@dataclass
class Beam(Strategy):
    """Beam search: ``beams`` beams x ``n_candidates`` fresh noises, keep the best by Tweedie reward."""

    name = "beam"
    beams: int = 0  # B: beams kept per search; 0 = fit to the budget
    n_candidates: int = 4  # N: candidate noises per beam at every step

    def _cost(self, s, b: int) -> tuple[float, float]:
        levels = len(noise_steps(s)) + 1  # + the initial noise
        n = self.n_candidates
        nfe = b * n * s.start_nfe + sum(b * n * s.step_nfe(i) for i in noise_steps(s)) + b * deterministic_nfe(s)
        calls = (levels * b * n if n > 1 else 0) + b  # with N = 1 every candidate is kept: no scoring
        return nfe, calls

    def search(self, problem: Problem) -> SearchResult:
        if self.n_candidates < 1:
            raise NoiseSearchError("--n-candidates must be at least 1")
        if self.beams < 0:
            raise NoiseSearchError("--beams must be >= 0 (0 = fit to the budget)")
        s, g = problem.sampler, problem.generator
        P, N = problem.num_searches, self.n_candidates
        what = lambda b: f"beam search with {b} beam(s) x {N} candidates"
        if self.beams:
            B = self.beams
            problem.check_affords(what(B), *self._cost(s, B))
        else:
            B = fit_count(problem, lambda b: self._cost(s, b), what)
        state = problem.start(B * N)
        if N > 1:  # with one candidate per beam all are kept: nothing to score
            state = state.select(topk_per_owner(problem.score(state), state.owner, B))
        steps = 0
        while True:
            state = advance(s, state)
            if state.step >= s.num_steps:
                break
            cand = state.repeat(N)
            cand = s.step(cand, s.noise(len(cand), g))
            state = cand.select(topk_per_owner(problem.score(cand), cand.owner, B)) if N > 1 else cand
            steps += 1
        rewards = problem.score(state)
        best = best_per_owner(rewards, state.owner, P)
        return SearchResult(
            x0=state.x0[best.to(state.x0.device)],
            rewards=rewards[best],
            info={"beams": B, "n_candidates": N, "searched_steps": steps + 1},
        )


__all__ = ["Beam"]
