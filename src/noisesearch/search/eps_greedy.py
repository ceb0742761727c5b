"""Epsilon-greedy and zero-order noise trajectory search (Ramesh & Mardani, arXiv 2506.03164).

At every sampling step that injects noise, the strategy runs ``K`` local-search iterations; in
each it tries ``N`` candidate noises per search: with probability ``eps`` a fresh Gaussian noise,
otherwise the pivot plus a perturbation whose direction is uniform on the sphere and whose radius is
uniform in ``[0, lambda * sqrt(d)]`` (``d`` = the noise dimension). Every candidate is stepped
(one network call per candidate for Euler-ancestral) and scored by the reward of its Tweedie
estimate; the best becomes the pivot. After ``K`` iterations the step is taken with the pivot: its
stepped state was already computed when it was scored, so the step itself costs nothing extra.

Variants (all options of the same strategy):

* ``elitist=False`` (the published algorithm): the pivot is replaced by the best new candidate even
  when that candidate is worse than the old pivot. ``elitist=True`` keeps the pivot unless beaten.
* ``sigma_window=(0.01, 1.0)``: the paper's cheaper schedule, ``K`` iterations only at steps whose
  noise level ``sigma_i`` (the level the step starts from) lies in the window, one elsewhere.
* ``search_init=True``: the initial noise ``x_T`` is searched the same way, scored by the Tweedie
  estimate of ``sampler.start`` (at ``sigma_0``). The default ``False`` draws it once: at
  ``sigma_0`` the Tweedie estimate is close to the data mean for every ``x_T`` (little signal to
  select on), and the first Euler-ancestral step adds fresh noise as large as what it keeps of
  ``x_T``, noise that the search does choose (on digits the two settings are within noise of each
  other at equal NFEs: docs/search.md).
* ``zero-order`` is the same strategy with ``eps = 0`` (pure local search around the pivot).

Budget: ``iterations=0`` (default) fits ``K`` to the budget: the largest ``K`` whose total cost
(``N * K_l`` candidates at every searched level ``l``, each ``sampler.step_nfe`` NFEs and one reward
call, plus the unsearched steps and one final reward call) fits; a level with a single candidate
(``N = K_l = 1``) offers no choice and is not scored, then one extra iteration at the
earliest searched levels while the leftover allows. With 18 Euler-ancestral steps and ``N = 4`` the
cost is ``1 + 68 K`` NFEs (``72 K`` with ``search_init``): the paper's ``K = 20`` is a 1440-NFE budget.

"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from noisesearch.errors import NoiseSearchError
from noisesearch.search.base import Problem, SearchResult, Strategy, advance, deterministic_nfe, fit_count, noise_steps
from noisesearch.sampling.samplers import Sampler, State


def bcast(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``mask`` [B] reshaped to broadcast against ``like`` [B, ...] (and moved to its device)."""
    return mask.to(like.device).view(-1, *([1] * (like.dim() - 1)))


def validate_window(window: tuple[float, ...]) -> tuple[float, float] | None:
    if not window:
        return None
    if len(window) != 2 or not window[0] <= window[1]:
        raise NoiseSearchError(f"--sigma-window takes two noise levels LO,HI with LO <= HI, got {window}")
    return float(window[0]), float(window[1])


# ---- the strategy ------------------------------------------------------------------------------
@dataclass
class EpsGreedy(Strategy):
    """Per-step epsilon-greedy local search over the injected noise (see the module docstring)."""

    name = "eps-greedy"
    n_candidates: int = 4  # N: candidate noises per local-search iteration
    iterations: int = 0  # K: iterations per searched step; 0 = fit to the budget (K=20 at 1440 NFEs, 18 steps)
    radius: float = 0.15  # lambda: perturbation radius uniform in [0, lambda * sqrt(d)]
    eps: float = 0.4  # probability that a candidate is a fresh Gaussian noise
    elitist: bool = False  # keep the pivot unless a candidate beats it (the paper: always replace)
    sigma_window: tuple[float, ...] = ()  # (lo, hi): K iterations only where lo <= sigma <= hi, one elsewhere
    search_init: bool = False  # also search the initial noise x_T (scored at sigma_0: little signal)

    # -- planning --
    def _levels(self, s: Sampler) -> list[tuple[int, float, int]]:
        """(step, sigma, nfe per candidate) of each searched level; step -1 is the initial noise."""
        levels = [(-1, float(s.sigmas[0]), s.start_nfe)] if self.search_init else []
        levels += [(i, float(s.sigmas[i]), s.step_nfe(i)) for i in noise_steps(s)]
        return levels

    def _cost(self, s: Sampler, ks: list[int]) -> tuple[float, float]:
        n = self.n_candidates
        levels = self._levels(s)
        nfe = sum(k * n * c for k, (_, _, c) in zip(ks, levels))
        nfe += deterministic_nfe(s) + (0 if self.search_init else s.start_nfe)
        calls = sum(k * n for k in ks if k * n > 1) + 1  # a lone candidate is not scored; + the final reward
        return nfe, calls

    def plan(self, problem: Problem) -> list[int]:
        """Iterations per searched level, fitted to the budget when ``iterations == 0``."""
        s = problem.sampler
        window = validate_window(self.sigma_window)
        levels = self._levels(s)
        inside = [window is None or window[0] <= sig <= window[1] for _, sig, _ in levels]

        def ks_for(k: int) -> list[int]:
            return [k if w else 1 for w in inside]

        what = lambda k: f"{self.name} with {self.n_candidates} candidates x {k} iteration(s) per step"
        if self.iterations > 0:
            ks = ks_for(self.iterations)
            problem.check_affords(what(self.iterations), *self._cost(s, ks))
            return ks
        if not any(inside):  # nothing to fit: one iteration everywhere
            ks = ks_for(1)
            problem.check_affords(what(1), *self._cost(s, ks))
            return ks
        k = fit_count(problem, lambda k: self._cost(s, ks_for(k)), what)
        ks = ks_for(k)
        for li, w in enumerate(inside):  # spend the leftover on the earliest searched levels
            if w:
                ks[li] += 1
                if not problem.budget.affords(*self._cost(s, ks)):
                    ks[li] -= 1
        return ks

    # -- search --
    def _validate(self) -> None:
        if self.n_candidates < 1:
            raise NoiseSearchError("--n-candidates must be at least 1")
        if self.iterations < 0:
            raise NoiseSearchError("--iterations must be >= 0 (0 = fit to the budget)")
        if not 0.0 <= self.eps <= 1.0:
            raise NoiseSearchError(f"--eps must be in [0, 1], got {self.eps}")
        if self.radius < 0:
            raise NoiseSearchError(f"--radius must be >= 0, got {self.radius}")

    def search(self, problem: Problem) -> SearchResult:
        self._validate()
        s, g = problem.sampler, problem.generator
        P, N = problem.num_searches, self.n_candidates
        ks = self.plan(problem)
        levels = self._levels(s)
        scale = self.radius * math.sqrt(s.noise_dim)
        replaced_worse = 0  # non-elitist replacements of a pivot by a worse candidate
        state = None if self.search_init else advance(s, problem.start(1))
        li = 0
        while True:
            if state is not None:
                state = advance(s, state)
                if state.step >= s.num_steps:
                    break
            step = -1 if state is None else state.step
            assert levels[li][0] == step
            base = None if state is None else state.repeat(N)
            pivot = s.noise(P, g)  # the initial pivot is a Gaussian draw (never used unevaluated)
            best: State | None = None
            best_score = torch.full((P,), float("-inf"))
            for _ in range(ks[li]):
                fresh = s.noise(P * N, g)
                direction = s.noise(P * N, g)
                coin = torch.rand(P * N, generator=g)
                r = torch.rand(P * N, generator=g)
                direction = direction / direction.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (direction.dim() - 1)))
                pert = pivot.repeat_interleave(N, 0) + bcast(r * scale, direction).to(direction.dtype) * direction
                cand = torch.where(bcast(coin < self.eps, fresh), fresh, pert)
                new = problem.start(N, noise=cand) if base is None else s.step(base, cand)
                if N * ks[li] == 1:  # a lone candidate: nothing to choose, so no reward call
                    best = new
                    break
                scores = problem.score(new)
                j = scores.view(P, N).argmax(1)
                rows = torch.arange(P) * N + j
                top = scores[rows]
                upd = top > best_score if self.elitist else torch.ones(P, dtype=torch.bool)
                if not self.elitist:
                    replaced_worse += int((top < best_score).sum())
                chosen = new.select(rows)
                if best is None:
                    best = chosen
                else:
                    best = replace(
                        best,
                        x=torch.where(bcast(upd, best.x), chosen.x, best.x),
                        x0=torch.where(bcast(upd, best.x0), chosen.x0, best.x0),
                    )
                pivot = torch.where(bcast(upd, pivot), cand[rows.to(cand.device)], pivot)
                best_score = torch.where(upd, top, best_score)
            state = best
            li += 1
        rewards = problem.score(state)
        return SearchResult(
            x0=state.x0,
            rewards=rewards,
            info={
                "n_candidates": N,
                "iterations_per_step": ks,
                "iterations_total": sum(ks),
                "search_init": self.search_init,
                "elitist": self.elitist,
                "pivot_replaced_by_worse": replaced_worse,
            },
        )


@dataclass
class ZeroOrder(EpsGreedy):
    """Zero-order search: epsilon-greedy with ``eps = 0`` (every candidate perturbs the pivot)."""

    name = "zero-order"
    eps: float = 0.0


__all__ = ["EpsGreedy", "ZeroOrder"]
