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

Budget: the size is the total number of local-search iterations over the searched levels, spread
evenly with the earliest levels first (``K_l = size // L`` plus one for the first ``size % L``
levels; levels outside ``sigma_window`` get one). ``iterations=K`` fixes the size at ``K * L``;
``iterations=0`` (default) fits it to the budget: the largest size whose total cost (``N * K_l``
candidates at every searched level ``l``, each ``sampler.step_nfe`` NFEs and one reward call,
plus the unsearched steps and one final reward call) fits. A level with a single candidate
(``N = K_l = 1``) offers no choice: it takes one fresh Gaussian noise, unscored, as a level that is
not searched does (no pivot or perturbation to draw). With 18 Euler-ancestral steps and ``N = 4`` the
cost is ``1 + 68 K`` NFEs (``72 K`` with ``search_init``): the paper's ``K = 20`` is a 1440-NFE budget.

Knobs chosen with the size: ``n_candidates=0`` (default) and ``score_every=0`` (default) let the sizer
(``Budget.fit_options``) take the affordable configuration nearest N = 4 with every level searched: the
configurations are N = 4, 3, 2 and k = 1, 2, ... levels (then N = 1: one trajectory), where only every k-th decision is searched
(decision 0 is ``x_T``, decision d the d-th noise step; searched: 1, 1 + k, ..., see
``scored_decision``) and the others take one fresh noise, unscored. So a budget or a reward price that
cannot pay N = 4 at every step gets fewer candidates or fewer searched steps instead of a refusal.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from noisesearch.budget import Cost
from noisesearch.errors import NoiseSearchError
from noisesearch.noise import NoiseSource
from noisesearch.sampling.samplers import Sampler, State
from noisesearch.search.base import (
    Problem,
    SearchResult,
    Strategy,
    advance,
    deterministic_nfe,
    scored_decision,
)

#: Candidates per iteration when ``n_candidates`` is left to the sizer (the most it tries; the paper's N).
DEFAULT_CANDIDATES = 4


def bcast(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``mask`` [B] reshaped to broadcast against ``like`` [B, ...] (and moved to its device)."""
    return mask.to(like.device).view(-1, *([1] * (like.dim() - 1)))


def validate_window(window: tuple[float, ...]) -> tuple[float, float] | None:
    if not window:
        return None
    if len(window) != 2 or not window[0] <= window[1]:
        raise NoiseSearchError(f"--sigma-window takes two noise levels LO,HI with LO <= HI, got {window}")
    return float(window[0]), float(window[1])


def candidate_noises(pivot: torch.Tensor, n: int, eps: float, radius: float, noise: NoiseSource) -> torch.Tensor:
    """The paper's ``n`` candidate noises around each pivot (rows grouped by pivot).

    With probability ``eps`` a candidate is a fresh Gaussian noise (global exploration); otherwise it
    is ``pivot + r * u`` with ``u`` uniform on the unit sphere and ``r`` uniform in
    ``[0, radius]``, ``radius = lambda * sqrt(d)`` (local exploitation). Every draw comes from the
    stream of the pivot's search: per candidate, two Gaussian draws (the fresh noise, then the
    direction) and two uniforms (the coin, then the radius), in two calls for all candidates.
    """
    owner = torch.arange(pivot.shape[0]).repeat_interleave(2 * n)
    gauss = noise.normal(owner).view(-1, 2, *pivot.shape[1:])
    fresh, direction = gauss[:, 0], gauss[:, 1]
    coin, r = noise.uniform(owner).view(-1, 2).unbind(1)
    direction = direction / bcast(direction.flatten(1).norm(dim=1).clamp_min(1e-12), direction)
    perturbed = pivot.repeat_interleave(n, 0) + bcast(r * radius, direction).to(direction.dtype) * direction
    return torch.where(bcast(coin < eps, fresh), fresh, perturbed)


# ---- the strategy ------------------------------------------------------------------------------
@dataclass
class EpsGreedy(Strategy):
    """Per-step epsilon-greedy local search over the injected noise (see the module docstring)."""

    name = "eps-greedy"
    size_option = "iterations"
    n_candidates: int = 0  # N: candidate noises per local-search iteration; 0 = chosen with the size (4 when affordable)
    iterations: int = 0  # K: iterations per searched step; 0 = fit to the budget (K=20 at 1440 NFEs, 18 steps)
    radius: float = 0.15  # lambda: perturbation radius uniform in [0, lambda * sqrt(d)]
    eps: float = 0.4  # probability that a candidate is a fresh Gaussian noise
    elitist: bool = False  # keep the pivot unless a candidate beats it (the paper: always replace)
    sigma_window: tuple[float, ...] = ()  # (lo, hi): K iterations only where lo <= sigma <= hi, one elsewhere
    search_init: bool = False  # also search the initial noise x_T (scored at sigma_0: little signal)
    score_every: int = 0  # search every k-th decision only (one fresh noise elsewhere); 0 = chosen with the size

    def validate(self) -> None:
        if self.n_candidates < 0:
            raise NoiseSearchError("--n-candidates must be >= 0 (0 = chosen with the budget)")
        if self.score_every < 0:
            raise NoiseSearchError("--score-every must be >= 0 (0 = chosen with the budget)")
        if self.iterations < 0:
            raise NoiseSearchError("--iterations must be >= 0 (0 = fit to the budget)")
        if not 0.0 <= self.eps <= 1.0:
            raise NoiseSearchError(f"--eps must be in [0, 1], got {self.eps}")
        if not 0.0 <= self.radius < float("inf"):
            raise NoiseSearchError(f"--radius must be finite and >= 0, got {self.radius}")
        validate_window(self.sigma_window)

    # -- planning --
    def levels(self, s: Sampler) -> list[tuple[int, float, int]]:
        """(step, sigma, nfe per candidate) of each searched level; step -1 is the initial noise."""
        return ([(-1, s.sigma(0), s.start_nfe)] if self.search_init else []) + s.decision_levels()

    @property
    def candidates(self) -> int:
        return self.n_candidates or DEFAULT_CANDIDATES

    def searched(self, levels: list) -> list[bool]:
        """Whether each level is searched (every ``score_every``-th decision; x_T is decision 0)."""
        first = 0 if self.search_init else 1
        return [scored_decision(first + i, self.score_every) for i in range(len(levels))]

    def _inside(self, levels: list) -> list[bool]:
        window = validate_window(self.sigma_window)
        return [window is None or window[0] <= sig <= window[1] for _, sig, _ in levels]

    def iterations_per_level(self, s: Sampler, size: int, levels: list | None = None) -> list[int]:
        """``size`` iterations spread over the searched levels inside the window, earliest first; one
        at the searched levels outside it; 0 (one fresh noise, unscored) at the levels not searched."""
        levels = self.levels(s) if levels is None else levels
        searched = self.searched(levels)
        inside = [w and f for w, f in zip(self._inside(levels), searched)]
        n_in = sum(inside)
        ks, seen = [], 0
        for w, f in zip(inside, searched):
            if w:
                ks.append(size // n_in + (1 if seen < size % n_in else 0))
                seen += 1
            else:
                ks.append(1 if f else 0)
        return ks

    def min_size(self, problem: Problem) -> int:
        levels = self.levels(problem.sampler)
        return max(1, sum(w and f for w, f in zip(self._inside(levels), self.searched(levels))))

    def requested_size(self, problem: Problem) -> int | None:
        return self.iterations * self.min_size(problem) or None

    def configurations(self, problem: Problem) -> list[tuple[Strategy, int]]:
        ns = [self.n_candidates] if self.n_candidates else range(DEFAULT_CANDIDATES, 1, -1)
        ks = [self.score_every] if self.score_every else range(1, len(self.levels(problem.sampler)) + 1)
        configs = [replace(self, n_candidates=n, score_every=k) for k in ks for n in ns]
        if not self.n_candidates:  # below them all: one candidate per decision, nothing scored but the end
            configs.append(replace(self, n_candidates=1, score_every=self.score_every or 1))
        return [(c, c.min_size(problem)) for c in configs]

    def knobs(self) -> dict:
        return {"n_candidates": self.n_candidates, "score_every": self.score_every}

    def describe(self, size: int) -> str:
        every = "" if self.score_every <= 1 else f", searching every {self.score_every}th decision"
        return f"{self.name} with {self.candidates} candidates and {size} iteration(s) over the searched steps{every}"

    def cost(self, problem: Problem, size: int) -> Cost:
        s, n, levels = problem.sampler, self.candidates, self.levels(problem.sampler)
        nfe, calls = deterministic_nfe(s) + (0 if self.search_init else s.start_nfe), 1
        for k, (_, _, step_nfe) in zip(self.iterations_per_level(s, size, levels), levels):
            rows = max(1, k * n)  # an unsearched level: one fresh noise
            nfe, calls = nfe + rows * step_nfe, calls + (rows if rows > 1 else 0)
        return problem.nfe_cost(nfe) + problem.score_cost(calls)

    # -- search --
    def run(self, problem: Problem, size: int) -> SearchResult:
        s = problem.sampler
        ks = self.iterations_per_level(s, size)
        levels = self.levels(s)
        replaced_worse = 0  # non-elitist replacements of a pivot by a worse candidate
        state = None if self.search_init else problem.start(1)
        for (step, _, _), k in zip(levels, ks):
            if state is not None:
                state = advance(s, state)
                assert state.step == step
            state, worse = self.search_level(problem, state, k)
            replaced_worse += worse
        state = advance(s, state)
        rewards = problem.score(state)
        return SearchResult(
            x0=state.x0,
            rewards=rewards,
            info={
                "n_candidates": self.candidates,
                "score_every": self.score_every,
                "iterations_per_step": ks,
                "iterations_total": sum(ks),
                "search_init": self.search_init,
                "elitist": self.elitist,
                "pivot_replaced_by_worse": replaced_worse,
            },
        )

    def search_level(self, problem: Problem, state: State | None, iterations: int) -> tuple[State, int]:
        """One contextual bandit: ``iterations`` rounds of ``N`` candidate noises around the pivot,
        each stepped and scored by its Tweedie reward; returns the state stepped with the final pivot
        (computed when it was scored) and how often a pivot was replaced by a worse candidate."""
        s, P, N = problem.sampler, problem.num_searches, self.candidates
        if N * iterations <= 1:  # not searched, or a lone candidate (nothing to choose): one fresh noise, unscored
            fresh = problem.noise.normal(torch.arange(P))
            return (problem.start(1, noise=fresh) if state is None else s.step(state, fresh)), 0
        radius = self.radius * math.sqrt(s.noise_dim)
        base = None if state is None else state.repeat(N)
        pivot = problem.noise.normal(torch.arange(P))  # the initial pivot (never used unevaluated)
        best: State | None = None
        best_score = torch.full((P,), float("-inf"))
        worse = 0
        for _ in range(iterations):
            cand = candidate_noises(pivot, N, self.eps, radius, problem.noise)
            new = problem.start(N, noise=cand) if base is None else s.step(base, cand)
            scores = problem.score(new)
            rows = torch.arange(P) * N + scores.view(P, N).argmax(1)
            top = scores[rows]
            chosen = new.select(rows)
            if not self.elitist:  # the best candidate always replaces the pivot
                worse += int((top < best_score).sum())
                best, pivot, best_score = chosen, cand[rows.to(cand.device)], top
                continue
            better = top > best_score
            if best is None:
                best = chosen
            else:
                best = replace(best, x=torch.where(bcast(better, best.x), chosen.x, best.x),
                               x0=torch.where(bcast(better, best.x0), chosen.x0, best.x0))
            pivot = torch.where(bcast(better, pivot), cand[rows.to(cand.device)], pivot)
            best_score = torch.where(better, top, best_score)
        return best, worse


@dataclass
class ZeroOrder(EpsGreedy):
    """Zero-order search: epsilon-greedy with ``eps = 0`` (every candidate perturbs the pivot)."""

    name = "zero-order"
    eps: float = 0.0


__all__ = ["EpsGreedy", "ZeroOrder", "candidate_noises"]
