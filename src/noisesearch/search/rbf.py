"""Rollover budget forcing (FlowRBF: Kim et al., arXiv 2503.19385), with the VP-SDE interpolant option.

The paper's terms:

* **budget forcing**: the ``C`` candidate evaluations of a search are spread evenly over its searched
  steps (``C // L`` per step, one more for the earliest ``C % L``). At a step, the search draws
  candidates one at a time: each takes the step from the current state with a fresh noise and is
  scored by the reward of its Tweedie estimate.
* **rollover**: as soon as a candidate beats the best reward the search has accepted so far, the
  search moves on with it, and the evaluations this step did not use roll over to the next step. A
  step whose budget runs out without an improvement moves on with its best candidate (nothing rolls
  over). The last searched step spends everything left and keeps its best (all its candidates in
  one batch: nothing can roll over past it, so this is the same as drawing them one at a time).
* **interpolant conversion** (``interpolant="vp"``): the paper turns a flow model's deterministic
  linear path into a variance-preserving SDE so that particles have diversity to select from. Here
  every sampler is already stochastic (Euler-ancestral, Heun with churn); ``vp`` re-times the
  trajectory to the VP interpolant (``sampling.schedules.vp_sigmas``: uniform VP times, linear beta,
  from the model's own first level, ``inf`` for a flow pipeline) instead of the model's schedule.

The initial noise is one Gaussian draw (as for eps-greedy). ``score_every = k`` searches every k-th
decision only (``scored_decision``): the other steps take one fresh noise, unscored.

Batching: all searches walk the steps together; at a step, every search still drawing takes one
candidate per wave (one network call for all of them), so a search's draws depend only on its own
stream and its own rewards.

Budget: ``candidates=0`` (default) fits ``C``: one trajectory, ``C - L`` extra candidate steps
(``sampler.step_nfe`` NFEs each: the plan is exact where every searched step costs the same, else
its worst case), ``C`` reward calls and one for the final sample. ``score_every=0`` (default) lets the
sizer choose k with C (``Budget.fit_options``): the affordable k nearest 1 (every decision searched),
with at least one candidate per searched step.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch

from noisesearch.budget import Cost
from noisesearch.errors import NoiseSearchError
from noisesearch.sampling.samplers import State
from noisesearch.sampling.schedules import vp_sigmas
from noisesearch.search.base import Problem, SearchResult, Strategy, best_per_owner, noise_steps, scored_decision

INTERPOLANTS = ("model", "vp")


@dataclass
class RBF(Strategy):
    """Rollover budget forcing: candidates one at a time per step, unused evaluations roll over."""

    name = "rbf"
    size_option = "candidates"
    candidates: int = 0  # C: candidate evaluations per search over all searched steps; 0 = fit to the budget
    interpolant: str = "model"  # model (the sampler's schedule) | vp (the VP-SDE interpolant's noise levels)
    score_every: int = 0  # search every k-th decision only (one fresh noise elsewhere); 0 = chosen with the size

    def validate(self) -> None:
        if self.interpolant not in INTERPOLANTS:
            raise NoiseSearchError(f"--interpolant must be one of {', '.join(INTERPOLANTS)}, got {self.interpolant!r}")
        if self.candidates < 0 or self.score_every < 0:
            raise NoiseSearchError("--candidates and --score-every must be >= 0 (0 = fit to the budget)")

    # -- planning --
    def on_interpolant(self, problem: Problem) -> Problem:
        """The problem sampled on the chosen interpolant (``vp``: a copy of the sampler re-timed)."""
        if self.interpolant == "model":
            return problem
        s = copy.copy(problem.sampler)
        s.sigmas = vp_sigmas(problem.sampler.num_steps, float(problem.sampler.sigmas[0]))
        return replace(problem, sampler=s)

    def levels(self, problem: Problem) -> list[int]:
        """Sampler steps searched (every ``score_every``-th noise step)."""
        return [st for d, st in enumerate(noise_steps(problem.sampler), 1) if scored_decision(d, self.score_every)]

    def per_level(self, problem: Problem, size: int) -> list[int]:
        L = len(self.levels(problem))
        return [size // L + (1 if i < size % L else 0) for i in range(L)]

    def min_size(self, problem: Problem) -> int:
        return max(1, len(self.levels(self.on_interpolant(problem))))

    def configurations(self, problem: Problem) -> list[tuple[Strategy, int]]:
        ks = [self.score_every] if self.score_every else range(1, len(noise_steps(self.on_interpolant(problem).sampler)) + 1)
        configs = [replace(self, score_every=k) for k in ks]
        return [(c, c.min_size(problem)) for c in configs]

    def knobs(self) -> dict:
        return {"score_every": self.score_every}

    def describe(self, size: int) -> str:
        return f"rbf with {size} candidate evaluation(s) over the searched steps"

    def exact_plan(self, problem: Problem) -> bool:
        """Exact unless the searched steps differ in NFEs (then the plan is the worst case)."""
        problem = self.on_interpolant(problem)
        return len({problem.sampler.step_nfe(i) for i in self.levels(problem)}) <= 1

    def cost(self, problem: Problem, size: int) -> Cost:
        problem = self.on_interpolant(problem)
        s, levels = problem.sampler, self.levels(problem)
        step_nfe = [s.step_nfe(i) for i in levels]
        extra = (size - len(levels)) * max(step_nfe, default=0)
        return problem.nfe_cost(s.nfe_per_trajectory + extra) + problem.score_cost(size + 1)

    # -- search --
    def run(self, problem: Problem, size: int) -> SearchResult:
        problem = self.on_interpolant(problem)
        P, levels = problem.num_searches, self.levels(problem)
        best = torch.full((P,), float("-inf"), dtype=torch.float64)
        carry = torch.zeros(P, dtype=torch.long)
        state = problem.start(1)
        rollovers = 0
        for i, (step, base) in enumerate(zip(levels, self.per_level(problem, size))):
            state = problem.rollout(state, until=step)
            state, carry, best, rolled = self.force_budget(problem, state, base + carry, best, last=i == len(levels) - 1)
            rollovers += rolled
        final = problem.rollout(state)
        return SearchResult(x0=final.x0, rewards=problem.score(final), info={
            "candidates": size, "interpolant": self.interpolant, "score_every": self.score_every,
            "searched_steps": len(levels), "rollovers": rollovers})

    def force_budget(self, problem: Problem, state: State, allowance: torch.Tensor, best: torch.Tensor, last: bool):
        """Budget forcing at one step: draw candidates until one beats ``best`` (then roll the unused
        allowance over) or the allowance is spent (then keep the step's best candidate).
        Returns (chosen states, carried allowance, new best, searches that rolled over).

        A step runs many small waves, so the per-search bookkeeping is plain Python on lists (fewer
        library calls than tensor or array operations on a few dozen rows) and the chosen rows are
        written in place into one copy of the first wave's rows."""
        s, P = problem.sampler, problem.num_searches
        if last:  # nothing rolls over past the last step: all its candidates at once, the best kept
            return self.spend_the_rest(problem, state, allowance), torch.zeros(P, dtype=torch.long), best, 0
        allowance, best = allowance.tolist(), best.tolist()
        used, carry, rolled = [0] * P, [0] * P, [False] * P
        step_best = [float("-inf")] * P
        chosen: State | None = None
        rows = list(range(P))
        while rows:
            at = torch.tensor(rows, dtype=torch.long)
            cand = s.step(state if len(rows) == len(state) else state.select(at), problem.noise.normal(at))
            r = problem.score(cand).double().tolist()
            better = [j for j, (p, v) in enumerate(zip(rows, r)) if v > step_best[p]]  # the step's best so far
            if chosen is None:  # the first wave: every search (better everywhere)
                chosen = cand.moved(cand.x.clone(), cand.x0.clone(), cand.step, cand.x0_at_x)
            elif better:
                into = torch.tensor([rows[j] for j in better], dtype=torch.long).to(chosen.x.device)
                pick = torch.tensor(better, dtype=torch.long).to(cand.x.device)
                chosen.x[into], chosen.x0[into] = cand.x[pick], cand.x0[pick]
            still = []
            for p, v in zip(rows, r):
                used[p] += 1
                step_best[p] = max(step_best[p], v)
                if v > best[p]:  # improved: move on, the rest of the allowance rolls over
                    carry[p], rolled[p] = allowance[p] - used[p], True
                elif used[p] < allowance[p]:
                    still.append(p)
            rows = still
        best = torch.tensor([b if rl else o for b, rl, o in zip(step_best, rolled, best)], dtype=torch.float64)
        return chosen, torch.tensor(carry, dtype=torch.long), best, sum(rolled)

    def spend_the_rest(self, problem: Problem, state: State, allowance: torch.Tensor) -> State:
        """The last step: each search's remaining ``allowance`` candidates in one batch (the same
        draws, in the same order, as one at a time), the best kept (the first of equals)."""
        rows = torch.arange(problem.num_searches).repeat_interleave(allowance)
        cand = problem.sampler.step(state.select(rows), problem.noise.normal(rows))
        return cand.select(best_per_owner(problem.score(cand), cand.owner, problem.num_searches))


__all__ = ["RBF", "INTERPOLANTS"]
