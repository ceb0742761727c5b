"""Beam search over noise trajectories.

Each search keeps ``B`` beams (partial trajectories). At every step that injects noise, each beam is
branched into ``N`` candidates with fresh Gaussian noises (``B * N`` rows per search, all searches in
one network call), every candidate is scored by the reward of its Tweedie estimate, and the best
``B`` of the ``B * N`` are kept (``topk_per_owner``; several may share a parent). The initial noise
is searched the same way: ``B * N`` starts, the best ``B`` kept. At the end the beam with the
highest final reward is returned.

Scoring only some steps: with ``score_every = k`` only every k-th decision branches and is scored
(decision 0 is the initial noise, decision d the d-th noise step; scored: 1, 1 + k, 1 + 2k, ..., see
``scored_decision``); at the others each beam takes one fresh noise, unscored.

Budget: ``beams=0`` (default) fits ``B`` to the budget. The cost per search is ``B * N`` candidates
per scored decision (``sampler.step_nfe`` NFEs and one reward call each), ``B`` rows through the other
steps, and ``B`` final reward calls: with 18 Euler-ancestral steps and every decision scored it is
``18 * B * N`` NFEs. With ``N = 1`` every candidate is kept, so nothing is scored but the final
images. ``B = 1`` is greedy (the best of ``N`` fresh noises at every step). ``n_candidates=0`` and
``score_every=0`` (defaults) are chosen with the size: the configurations are N = 4, 3, 2 with
k = 1, 2, ... (then N = 1, B independent trajectories), and the sizer takes the affordable one nearest N = 4, k = 1 (``Budget.fit_options``):
4 candidates at every decision whenever the budget affords one beam of them.

What ``B`` beams leave of the budget (less than one more beam: with a priced reward up to half of
it) is spent on **extra candidates**: when the sizer fitted both ``B`` and ``N``, ``E`` more
candidates per beam, the most the rest affords, one more at each scored decision in order (the
earliest first, as eps-greedy spreads its iterations): decision ``i`` of the ``D`` scored ones
branches ``N + E // D + (1 if i < E % D)``. ``extra_candidates=0`` (default) fits ``E``;
a user's ``--beams`` or ``--n-candidates`` is run as given, without extra candidates.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from noisesearch.budget import Cost
from noisesearch.errors import NoiseSearchError
from noisesearch.sampling.samplers import State
from noisesearch.search.base import (
    Problem,
    SearchResult,
    Strategy,
    advance,
    best_per_owner,
    noise_steps,
    scored_decision,
    topk_per_owner,
)

#: Candidates per decision when ``n_candidates`` is left to the sizer (the most it tries).
DEFAULT_CANDIDATES = 4


@dataclass
class Beam(Strategy):
    """Beam search: ``beams`` beams x ``n_candidates`` fresh noises, keep the best by Tweedie reward."""

    name = "beam"
    size_option = "beams"
    leftover_option = "extra_candidates"  # what B beams leave: extra candidates per beam (module docstring)
    leftover_unless = ("beams", "n_candidates")
    beams: int = 0  # B: beams kept per search; 0 = fit to the budget
    n_candidates: int = 0  # N: candidate noises per beam at a scored decision; 0 = chosen with the size (4 when affordable)
    score_every: int = 0  # branch and score every k-th decision only; 0 = chosen with the size (1 when affordable)
    extra_candidates: int = 0  # E: more candidates per beam over the scored decisions; 0 = what the budget leaves when B and N are fitted

    def validate(self) -> None:
        if self.n_candidates < 0:
            raise NoiseSearchError("--n-candidates must be >= 0 (0 = chosen with the budget)")
        if self.beams < 0:
            raise NoiseSearchError("--beams must be >= 0 (0 = fit to the budget)")
        if self.score_every < 0:
            raise NoiseSearchError("--score-every must be >= 0 (0 = chosen with the budget)")
        if self.extra_candidates < 0:
            raise NoiseSearchError("--extra-candidates must be >= 0 (0 = what the beams leave of the budget)")

    def describe(self, size: int) -> str:
        every = "" if self.score_every <= 1 else f", scored at every {self.score_every}th decision"
        return f"beam search with {size} beam(s) x {self.n_candidates or DEFAULT_CANDIDATES} candidates{every}"

    def knobs(self) -> dict:
        return {"n_candidates": self.n_candidates, "score_every": self.score_every, "extra_candidates": self.extra_candidates}

    def configurations(self, problem: Problem) -> list[tuple[Strategy, int]]:
        ns = [self.n_candidates] if self.n_candidates else range(DEFAULT_CANDIDATES, 1, -1)
        ks = [self.score_every] if self.score_every else range(1, len(noise_steps(problem.sampler)) + 1)
        configs = [replace(self, n_candidates=n, score_every=k) for k in ks for n in ns]
        if not self.n_candidates:  # below them all: B independent trajectories, nothing scored but the end
            configs.append(replace(self, n_candidates=1, score_every=self.score_every or 1))
        return [(c, 1) for c in configs]

    def branching(self, decisions: int) -> list[int]:
        """Candidates per beam at each of decisions 0..``decisions - 1``: N (plus its share of the extra
        candidates) where it is scored, else 1."""
        scored = [d for d in range(decisions) if scored_decision(d, self.score_every)]
        n, extra = self.n_candidates or DEFAULT_CANDIDATES, self.extra_candidates
        ns = [1] * decisions
        for i, d in enumerate(scored):
            ns[d] = n + extra // len(scored) + (1 if i < extra % len(scored) else 0)
        return ns

    def cost(self, problem: Problem, size: int) -> Cost:
        s, b = problem.sampler, size
        steps = noise_steps(s)
        ns = self.branching(len(steps) + 1)  # decision 0: the initial noise
        nfe = b * ns[0] * s.start_nfe + sum(b * n * s.step_nfe(i) for n, i in zip(ns[1:], steps))
        nfe += b * sum(s.step_nfe(i) for i in range(s.num_steps) if i not in steps)
        scored = sum(b * n for n in ns if n > 1)  # a decision with one candidate per beam keeps it: no scoring
        return problem.nfe_cost(nfe) + problem.score_cost(scored + b)

    def keep_best(self, problem: Problem, candidates: State, beams: int) -> State:
        """The ``beams`` best candidates of each search by the reward of their Tweedie estimates."""
        if len(candidates) == beams * problem.num_searches:  # every candidate is kept: nothing to score
            return candidates
        return candidates.select(topk_per_owner(problem.score(candidates), candidates.owner, beams))

    def run(self, problem: Problem, size: int) -> SearchResult:
        s = problem.sampler
        ns = self.branching(len(noise_steps(s)) + 1)
        state = self.keep_best(problem, problem.start(size * ns[0]), size)
        decision = 0
        while True:
            state = advance(s, state)
            if state.step >= s.num_steps:
                break
            decision += 1
            branches = state.repeat(ns[decision])
            state = self.keep_best(problem, s.step(branches, problem.noise.normal(branches.owner)), size)
        rewards = problem.score(state)
        best = best_per_owner(rewards, state.owner, problem.num_searches)
        return SearchResult(
            x0=state.x0[best.to(state.x0.device)],
            rewards=rewards[best],
            info={"beams": size, "n_candidates": self.n_candidates, "score_every": self.score_every,
                  "extra_candidates": self.extra_candidates, "searched_steps": sum(n > 1 for n in ns[: decision + 1])},
        )


__all__ = ["Beam"]
