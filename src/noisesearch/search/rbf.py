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

Batching (``_Walk``): every search walks on its own, and a wave takes one move of every search that
has not finished, wherever it is, in one network call and one reward call; a search's draws depend
only on its own stream and its own rewards.

Budget: ``candidates=0`` (default) fits ``C``: one trajectory, ``C - L`` extra candidate steps
(``sampler.step_nfe`` NFEs each: the plan is exact where every searched step costs the same, else
its worst case), ``C`` reward calls and one for the final sample. ``score_every=0`` (default) lets the
sizer choose k with C (``Budget.fit_options``): the affordable k nearest 1 (every decision searched),
with at least one candidate per searched step.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import numpy as np
import torch

from noisesearch.budget import Cost
from noisesearch.errors import NoiseSearchError
from noisesearch.sampling.samplers import State
from noisesearch.sampling.schedules import vp_sigmas
from noisesearch.search.base import Problem, SearchResult, Strategy, noise_steps, scored_decision

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
        levels = self.levels(problem)
        walk = _Walk(problem, levels, self.per_level(problem, size))
        while walk.wave():
            pass
        final = walk.final()
        return SearchResult(x0=final.x0, rewards=problem.score(final), info={
            "candidates": size, "interpolant": self.interpolant, "score_every": self.score_every,
            "searched_steps": len(levels), "rollovers": walk.rollovers, "waves": walk.waves})


MOVE, CANDIDATE, LAST = 0, 1, 2  # what a row of a wave is: an unsearched step, a candidate, the last step's batch


class _Walk:
    """Budget forcing and rollover, each search on its own: at a searched step a search draws
    candidates one at a time until one beats the best reward it has accepted (it moves on with it, and
    the step's unused evaluations roll over to its next searched step) or the step's allowance is spent
    (it moves on with the step's best candidate); the last searched step spends everything left in one
    batch (nothing can roll over past it). Unsearched steps take one fresh noise.

    Batching: every wave takes one move of every search that has not finished, wherever it is (searches
    that rolled over early are steps ahead of those still drawing), in one network call
    (``Sampler.step_rows``) and one reward call. A search's draws still come in its own order from its
    own stream, so its result does not depend on the others; one wave per move of the longest walk
    instead of one per draw of the slowest search at every step (Euler-ancestral, 18 steps, 72 NFEs, 80
    searches: 69 network calls of about 83 rows, against 163 of about 35 with all searches at the same
    step; docs/search.md)."""

    def __init__(self, problem: Problem, levels: list[int], per_level: list[int]):
        self.problem, self.levels, self.per_level = problem, levels, per_level
        state = problem.start(1)
        self.x, self.x0, P = state.x.clone(), state.x0.clone(), problem.num_searches
        self.cx, self.cx0 = self.x.clone(), self.x0.clone()  # each search's best candidate at its current step
        self.step = [state.step] * P  # where each search's state is
        self.at_x = [state.x0_at_x] * P  # whether its x0 is the estimate at its x (a sampler may reuse it)
        self.c_at_x = list(self.at_x)  # the same for its best candidate
        self.level = [0] * P  # its next searched step (index into levels)
        self.allowance = [per_level[0] if per_level else 0] * P
        self.used = [0] * P
        self.best = [float("-inf")] * P  # the best reward it has accepted (moved on with)
        self.step_best = [float("-inf")] * P  # the best candidate at its current searched step
        self.rollovers = self.waves = 0
        self.noisy = set(problem.sampler.noise_steps())  # the steps that inject noise

    def kinds(self) -> tuple[list[int], list[int]]:
        """The rows of the next wave (a search index per row, grouped by search) and what each is."""
        rows, kinds, L, end = [], [], len(self.levels), self.problem.sampler.num_steps
        for p, t in enumerate(self.step):
            if t >= end:
                continue
            li = self.level[p]
            searched = li < L and t == self.levels[li]
            n = self.allowance[p] if searched and li == L - 1 else 1
            rows += [p] * n
            kinds += [(LAST if li == L - 1 else CANDIDATE) if searched else MOVE] * n
        return rows, kinds

    def wave(self) -> bool:
        """One move of every unfinished search; False when every search has finished."""
        rows, kinds = self.kinds()
        if not rows:
            return False
        self.waves += 1
        problem, s = self.problem, self.problem.sampler
        at = torch.tensor(rows, dtype=torch.long)
        steps = [self.step[p] for p in rows]
        on = at.to(self.x.device)
        xn, x0n, at_x = s.step_rows(self.x[on], self.x0[on], steps, self.noise(at, steps), problem.cond_rows(at), at,
                                    [self.at_x[p] for p in rows])
        scored = [r for r, k in enumerate(kinds) if k != MOVE]
        values = dict(zip(scored, self.score(xn, x0n, at, steps, scored)))
        self.advance(rows, kinds, values, xn, x0n, at_x)
        return True

    def noise(self, at: torch.Tensor, steps: list[int]) -> torch.Tensor:
        """A fresh noise for every row whose step injects one (from its search's stream, in row order),
        zeros for the others."""
        problem = self.problem
        noisy = [r for r, t in enumerate(steps) if t in self.noisy]
        if len(noisy) == len(steps):
            return problem.noise.normal(at)
        z = torch.zeros(len(steps), *self.x.shape[1:], dtype=self.x.dtype, device=self.x.device)
        if noisy:
            idx = torch.tensor(noisy, dtype=torch.long)
            z[idx.to(z.device)] = problem.noise.normal(at[idx])
        return z

    def score(self, xn, x0n, at, steps, scored: list[int]) -> list[float]:
        """Rewards of the scored rows, in one reward call (one per step when a trace records them)."""
        if not scored:
            return []
        groups = [scored]
        if self.problem.trace is not None:
            by_step: dict[int, list[int]] = {}
            for r in scored:
                by_step.setdefault(steps[r], []).append(r)
            groups = list(by_step.values())
        out: dict[int, float] = {}
        for g in groups:
            if len(g) == len(steps):  # every row of the wave: as they are, no copy
                xs, x0s, who = xn, x0n, at
            else:
                idx = torch.tensor(g, dtype=torch.long)
                on, who = idx.to(xn.device), at[idx]
                xs, x0s = xn[on], x0n[on]
            state = State(xs, x0s, steps[g[0]] + 1, self.problem.cond_rows(who), who)  # x0_at_x: unused by score
            out.update(zip(g, self.problem.score(state).tolist()))  # float32 to Python floats: exact
        return [out[r] for r in scored]

    def advance(self, rows, kinds, values: dict[int, float], xn, x0n, at_x: list[bool]) -> None:
        """Each search's bookkeeping after a wave: its new best candidate, and where it moves on."""
        into_c, from_c = [], []  # new best candidates: search, row
        into_x, from_x = [], []  # new states from this wave's rows: search, row
        keep = []  # searches moving on with their best candidate
        r = 0
        while r < len(rows):
            p, kind = rows[r], kinds[r]
            n = self.allowance[p] if kind == LAST else 1
            if kind == MOVE:
                into_x.append(p), from_x.append(r)
                self.step[p] += 1
            elif kind == LAST:
                got = [values[q] for q in range(r, r + n)]
                into_x.append(p), from_x.append(r + got.index(max(got)))  # the first of equals
                self.step[p] += 1
                self.level[p] += 1
            else:
                self.candidate(p, r, values[r], into_c, from_c, into_x, from_x, keep)
            r += n
        self.write(self.cx, self.cx0, into_c, from_c, xn, x0n)
        for p, r in zip(into_c, from_c):
            self.c_at_x[p] = at_x[r]
        self.write(self.x, self.x0, keep, keep, self.cx, self.cx0)
        for p in keep:
            self.at_x[p] = self.c_at_x[p]
        self.write(self.x, self.x0, into_x, from_x, xn, x0n)
        for p, r in zip(into_x, from_x):
            self.at_x[p] = at_x[r]

    def candidate(self, p: int, r: int, v: float, into_c, from_c, into_x, from_x, keep) -> None:
        """Search ``p``'s candidate (row ``r``, reward ``v``) at a searched step that is not the last."""
        self.used[p] += 1
        if v > self.step_best[p]:
            self.step_best[p] = v
            into_c.append(p), from_c.append(r)
        if v > self.best[p]:  # improved: move on with it, the rest of the allowance rolls over
            carry = self.allowance[p] - self.used[p]
            self.best[p] = v
            self.rollovers += 1
            into_x.append(p), from_x.append(r)
        elif self.used[p] == self.allowance[p]:  # spent: move on with the step's best candidate
            carry = 0
            keep.append(p)
        else:
            return
        self.step[p] += 1
        self.level[p] += 1
        self.allowance[p] = self.per_level[self.level[p]] + carry
        self.used[p], self.step_best[p] = 0, float("-inf")

    @staticmethod
    def write(x, x0, into: list[int], rows: list[int], xn, x0n) -> None:
        if into:
            dst = torch.from_numpy(np.array(into, dtype=np.int64)).to(x.device)  # cheaper than torch.tensor(list)
            src = torch.from_numpy(np.array(rows, dtype=np.int64)).to(xn.device)
            x[dst], x0[dst] = xn[src], x0n[src]

    def final(self) -> State:
        P = self.problem.num_searches
        return State(self.x, self.x0, self.problem.sampler.num_steps, self.problem.cond, torch.arange(P))


__all__ = ["RBF", "INTERPOLANTS"]
