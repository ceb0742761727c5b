"""Rollover budget forcing (FlowRBF: Kim et al., arXiv 2503.19385), with the VP-SDE interpolant option.

The paper's terms:

* **budget forcing**: the ``C`` candidate evaluations of a search are spread evenly over its searched
  steps (``C // L`` per step, one more for the earliest ``C % L``). At a step, the search draws
  candidates one at a time: each takes the step from the current state with a fresh noise and is
  scored by the reward of its Tweedie estimate.
* **rollover**: as soon as a candidate beats the best reward the search has accepted so far, the
  search moves on with it, and the evaluations this step did not use roll over to the next step. A
  step whose budget runs out without an improvement moves on with its best candidate (nothing rolls
  over). The last searched step spends everything left and keeps its best (nothing can roll over
  past it: its draws do not stop at an improvement).
* **interpolant conversion** (``interpolant="vp"``): the paper turns a flow model's deterministic
  linear path into a variance-preserving SDE so that particles have diversity to select from. Here
  every sampler is already stochastic (Euler-ancestral, Heun with churn); ``vp`` re-times the
  trajectory to the VP interpolant (``sampling.schedules.vp_sigmas``: uniform VP times, linear beta,
  from the model's own first level, ``inf`` for a flow pipeline) instead of the model's schedule.

The initial noise is one Gaussian draw (as for eps-greedy). ``score_every = k`` searches every k-th
decision only (``scored_decision``): the other steps take one fresh noise, unscored.

Batching (``_Walk``): every search walks on its own, and a wave takes one move of every search,
wherever it is, in one network call and one reward call; a search's draws depend only on its own
stream and its own rewards. Every search makes the same number of moves, so every wave has one row
per search (one batch shape) until all stand at the last searched step, whose remaining draws go in
calls of at most ``max_batch`` rows.

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
        levels = self.levels(problem)
        walk = _Walk(problem, levels, self.per_level(problem, size))
        while walk.wave():
            pass
        final = walk.final()
        return SearchResult(x0=final.x0, rewards=problem.score(final), info={
            "candidates": size, "interpolant": self.interpolant, "score_every": self.score_every,
            "searched_steps": len(levels), "rollovers": walk.rollovers, "waves": walk.waves})


class _Walk:
    """Budget forcing and rollover, each search on its own: at a searched step a search draws
    candidates one at a time until one beats the best reward it has accepted (it moves on with it, and
    the step's unused evaluations roll over to its next searched step) or the step's allowance is spent
    (it moves on with the step's best candidate); at the last searched step it draws everything left
    and keeps the best. Unsearched steps take one fresh noise.

    Batching: every wave takes one move (a draw, or an unsearched step) of every search, wherever it
    is (searches that rolled over early are steps ahead of those still drawing), in one network call
    (``Sampler.step_rows``) and one reward call. Every search makes the same number of moves, so every
    search is in every wave, as one row: an Euler-ancestral network call always sees one batch shape
    (torch's CPU convolutions build kernels for each new one: ``tools/shape_cost.py``), and the
    bookkeeping is a few array operations on all searches at once. Once every search stands at the
    last searched step, the draws they have left there go in calls of at most ``max_batch`` rows
    (their order there does not matter). A search's draws still come in its own order from its own
    stream, so its result does not depend on the others (Euler-ancestral, 18 steps, 72 NFEs, 80
    searches: 68 waves of 80 rows, then 320 draws, against 163 network calls of about 35 rows with
    all searches at the same step; docs/search.md)."""

    def __init__(self, problem: Problem, levels: list[int], per_level: list[int]):
        self.problem, self.levels, self.per_level = problem, np.array(levels, dtype=np.int64), np.array(per_level)
        state = problem.start(1)
        self.x, self.x0, P = state.x, state.x0, problem.num_searches
        self.owner = state.owner  # every search, in order: the rows of every wave
        self.cx, self.cx0 = self.x, self.x0  # each search's best candidate at its current step
        self.step = np.full(P, state.step, dtype=np.int64)  # where each search's state is
        self.at_x = np.full(P, state.x0_at_x)  # whether its x0 is the estimate at its x (a sampler may reuse it)
        self.c_at_x = self.at_x.copy()  # the same for its best candidate
        self.level = np.zeros(P, dtype=np.int64)  # its next searched step (index into levels)
        self.allowance = np.full(P, per_level[0] if per_level else 0, dtype=np.int64)
        self.used = np.zeros(P, dtype=np.int64)
        self.best = np.full(P, -np.inf)  # the best reward it has accepted (moved on with)
        self.step_best = np.full(P, -np.inf)  # the best candidate at its current searched step
        self.rollovers = self.waves = 0
        self.noisy = np.zeros(problem.sampler.num_steps + 1, dtype=bool)  # the steps that inject noise
        self.noisy[list(problem.sampler.noise_steps())] = True

    def searched(self) -> np.ndarray:
        """Whether each search stands at its next searched step (its move is a draw)."""
        L = len(self.levels)
        if not L:
            return np.zeros(self.step.size, dtype=bool)
        return (self.level < L) & (self.step == self.levels[np.minimum(self.level, L - 1)])

    def wave(self) -> bool:
        """One move of every search (or, once all stand at the last searched step, all the draws they
        have left there); False when every search has finished."""
        done = self.step >= self.problem.sampler.num_steps
        if done.all():
            return False
        if done.any():  # every search makes as many moves as the others: they finish in the same wave
            raise RuntimeError("rbf: some searches finished before the others (a defect of the walk)")
        self.waves += 1
        draw = self.searched()
        if draw.all() and (self.level == len(self.levels) - 1).all():
            self.last_step()
            return True
        steps = self.step
        xn, x0n, at_x = self.problem.sampler.step_rows(self.x, self.x0, steps, self.noise(self.owner, steps),
                                                       self.problem.cond, self.owner, self.at_x)
        values = self.score(xn, x0n, self.owner, steps, np.flatnonzero(draw))
        self.advance(draw, values, xn, x0n, at_x)
        return True

    def noise(self, at: torch.Tensor, steps: np.ndarray) -> torch.Tensor:
        """A fresh noise for every row whose step injects one (from its search's stream, in row order),
        zeros for the others."""
        noisy = self.noisy[steps]
        if noisy.all():
            return self.problem.noise.normal(at)
        z = torch.zeros(len(steps), *self.x.shape[1:], dtype=self.x.dtype, device=self.x.device)
        if noisy.any():
            idx = torch.from_numpy(np.flatnonzero(noisy))
            z[idx.to(z.device)] = self.problem.noise.normal(at[idx])
        return z

    def score(self, xn, x0n, at, steps: np.ndarray, scored: np.ndarray) -> np.ndarray:
        """Rewards of the scored rows (float64, in row order), in one reward call (one per step when a
        trace records them)."""
        out = np.empty(scored.size)
        if not scored.size:
            return out
        groups = [np.arange(scored.size)]
        if self.problem.trace is not None:
            groups = [np.flatnonzero(steps[scored] == t) for t in np.unique(steps[scored])]
        for g in groups:
            rows = scored[g]
            if rows.size == len(steps):  # every row of the wave: as they are, no copy
                xs, x0s, who = xn, x0n, at
                cond = self.problem.cond if at is self.owner else self.problem.cond_rows(at)
            else:
                idx = torch.from_numpy(rows)
                on, who = idx.to(xn.device), at[idx]
                xs, x0s, cond = xn[on], x0n[on], self.problem.cond_rows(who)
            state = State(xs, x0s, int(steps[rows[0]]) + 1, cond, who)  # x0_at_x: unused by score
            out[g] = self.problem.score(state).numpy()  # float32 to float64: exact
        return out

    def advance(self, draw: np.ndarray, values: np.ndarray, xn, x0n, at_x: np.ndarray) -> None:
        """Each search's bookkeeping after a wave (row p = search p): its new best candidate, and
        whether it moves on (with this wave's row, or with its step's best candidate) or draws again."""
        v = np.full(draw.size, -np.inf)
        v[draw] = values
        self.used += draw
        better = v > self.step_best  # a new best candidate at the step (never for a row that did not draw)
        self.step_best = np.maximum(v, self.step_best)
        self.cx, self.cx0, self.c_at_x = self.where(better, xn, x0n, at_x, self.cx, self.cx0, self.c_at_x)
        last = self.level == len(self.levels) - 1
        improved = draw & ~last & (v > self.best)  # move on with it; the rest of the allowance rolls over
        spent = draw & ~improved & (self.used == self.allowance)  # move on with the step's best candidate
        self.best[improved] = v[improved]
        self.rollovers += int(improved.sum())
        moving = ~draw | improved  # with this wave's row
        self.x, self.x0, self.at_x = self.where(moving, xn, x0n, at_x, self.x, self.x0, self.at_x)
        self.x, self.x0, self.at_x = self.where(spent, self.cx, self.cx0, self.c_at_x, self.x, self.x0, self.at_x)
        self.leave(improved | spent, np.where(improved, self.allowance - self.used, 0))
        self.step += moving | spent

    def leave(self, on: np.ndarray, carry: np.ndarray) -> None:
        """Searches ``on`` leave their searched step, with ``carry`` evaluations for the next one."""
        self.level += on
        nxt = np.minimum(self.level, len(self.per_level) - 1)
        more = on & (self.level < len(self.levels))
        self.allowance[on] = 0
        self.allowance[more] = self.per_level[nxt[more]] + carry[more]
        self.used[on], self.step_best[on] = 0, -np.inf

    def last_step(self) -> None:
        """Every search at the last searched step: the draws each has left there (rows grouped by
        search), in calls of at most ``max_batch`` rows (what the network call would chunk them into
        anyway; a call's states, noises and estimates are held at once); each search moves on with
        the best candidate of the step, the first of equals."""
        left = self.allowance - self.used
        rows = np.repeat(np.arange(left.size), left)
        size = max(1, self.problem.sampler.max_batch)
        for lo in range(0, rows.size, size):
            self.best_of(rows[lo:lo + size])
        self.x, self.x0, self.at_x = self.cx, self.cx0, self.c_at_x.copy()
        self.leave(np.ones(left.size, dtype=bool), np.zeros(left.size, dtype=np.int64))
        self.step += 1

    def best_of(self, rows: np.ndarray) -> None:
        """A draw for every row (``rows``: search indices, grouped) at its search's step, in one call;
        a search's best candidate of the step becomes the best of its rows where that beats it."""
        problem, at = self.problem, torch.from_numpy(rows)
        on, steps = at.to(self.x.device), self.step[rows]
        xn, x0n, at_x = problem.sampler.step_rows(self.x[on], self.x0[on], steps, self.noise(at, steps),
                                                  problem.cond_rows(at), at, self.at_x[rows])
        values = self.score(xn, x0n, at, steps, np.arange(rows.size))
        p, local = np.unique(rows, return_inverse=True)  # the call's searches; each row's among them
        pick = np.zeros(self.step.size, dtype=np.int64)  # each search's best row of the call (first of equals)
        pick[p] = best_per_owner(torch.from_numpy(values), torch.from_numpy(local), p.size).numpy()
        better = np.zeros(self.step.size, dtype=bool)
        better[p] = values[pick[p]] > self.step_best[p]
        self.step_best[better] = values[pick[better]]
        idx = torch.from_numpy(pick).to(xn.device)
        self.cx, self.cx0, self.c_at_x = self.where(better, xn[idx], x0n[idx], at_x[pick],
                                                    self.cx, self.cx0, self.c_at_x)

    @staticmethod
    def where(mask: np.ndarray, x, x0, flags: np.ndarray, other_x, other_x0, other_flags: np.ndarray):
        """Per search: ``(x, x0, flags)`` where ``mask``, else the others (the others themselves when
        the mask is empty)."""
        if not mask.any():
            return other_x, other_x0, other_flags
        if mask.all():
            return x, x0, flags.copy()
        m = torch.from_numpy(mask).to(x.device).view(-1, *([1] * (x.dim() - 1)))
        return torch.where(m, x, other_x), torch.where(m, x0, other_x0), np.where(mask, flags, other_flags)

    def final(self) -> State:
        P = self.problem.num_searches
        return State(self.x, self.x0, self.problem.sampler.num_steps, self.problem.cond, torch.arange(P))


__all__ = ["RBF", "INTERPOLANTS"]
