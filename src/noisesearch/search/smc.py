"""Sequential Monte Carlo / Feynman-Kac steering (Singhal et al. 2025) over noise trajectories.

Each search runs ``K`` particles (trajectories) in parallel with fresh Gaussian noise. After every
step the particles' Tweedie estimates are scored and their log-weights grow by the log of an
incremental potential:

* ``diff`` (default): ``lambda * (r_t - r_{t-1})``; the product telescopes to
  ``exp(lambda * r_t)`` since the last resampling, so the final target is ``p(x) exp(lambda r(x))``;
* ``max``: ``lambda * (max_{s<=t} r_s - max_{s<=t-1} r_s)``, i.e. the potential ``exp(lambda max r)``;
* ``sum``: ``lambda * r_t`` (the potential ``exp(lambda * sum of rewards)``).

The initial particles are weighted by ``exp(lambda * r_0)``. When the effective sample size
``(sum w)^2 / sum w^2`` drops below ``ess_threshold * K`` the particles of that search are resampled
(systematic or multinomial, with uniforms from each search's noise stream) and the weights reset. At the end the
particle with the highest final reward is returned.

Scoring only at some steps (FK steering's resampling interval): with ``score_every = k`` the particles
are weighed (and may be resampled) at every k-th decision point only (decision 0 is the state at
``sigma_0``, decision d the state after the d-th noise step; scored: 1, 1 + k, 1 + 2k, ...; k = 1 all).

Budget: ``particles=0`` (default) fits ``K`` to the budget: ``K`` full trajectories
(``K * sampler.nfe_per_trajectory`` NFEs) and one reward call per particle at every scored decision
point plus a final one (with ``K = 1`` only the final one: a lone particle's weight never matters).
``score_every=0`` (default) lets the sizer choose k with K: the configurations are k = 1, 2, ... with at
least 4 particles (where none of those is affordable: at least 3, then 2, then one particle, unscored),
and the sizer takes the affordable one nearest to k = 1 (``Budget.fit_options``), so an expensive reward
thins the scored steps before it costs particles.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from noisesearch.budget import Cost
from noisesearch.errors import NoiseSearchError
from noisesearch.noise import NoiseSource
from noisesearch.search.base import (
    Problem,
    SearchResult,
    Strategy,
    advance,
    best_per_owner,
    noise_steps,
    scored_decision,
)

POTENTIALS = ("diff", "max", "sum")
#: Smallest particle counts the sizer tries, in order (see ``SMC.configurations``).
PARTICLE_TIERS = (4, 3, 2)
RESAMPLING = ("systematic", "multinomial")


def resample_indices(log_w: torch.Tensor, noise: NoiseSource, method: str) -> torch.Tensor:
    """Ancestor index (within its search) of each new particle. ``log_w`` [P, K] -> long [P, K]
    (row p of ``log_w`` is search p; its uniforms come from that search's stream)."""
    P, K = log_w.shape
    w = torch.softmax(log_w.double(), dim=1)
    if method == "multinomial":
        u = noise.uniform(torch.arange(P).repeat_interleave(K), torch.float64).view(P, K).sort(dim=1).values
    else:
        u = (noise.uniform(torch.arange(P), torch.float64).view(P, 1) + torch.arange(K, dtype=torch.float64)) / K
    cdf = w.cumsum(1)
    cdf[:, -1] = 1.0
    return torch.searchsorted(cdf, u, right=True).clamp_max(K - 1)


@dataclass
class SMC(Strategy):
    """Particles weighted by a potential of their Tweedie rewards, resampled when the ESS drops."""

    name = "smc"
    particles: int = 0  # K: particles per search; 0 = fit to the budget
    potential: str = "diff"  # diff | max | sum (FK steering's potentials)
    potential_scale: float = 10.0  # lambda: potential = exp(lambda * ...)
    ess_threshold: float = 0.5  # resample when ESS < ess_threshold * K
    resampling: str = "systematic"  # systematic | multinomial
    score_every: int = 0  # weigh/resample at every k-th decision point only; 0 = chosen with the size

    size_option = "particles"

    def validate(self) -> None:
        if self.potential not in POTENTIALS:
            raise NoiseSearchError(f"--potential must be one of {', '.join(POTENTIALS)}, got {self.potential!r}")
        if self.resampling not in RESAMPLING:
            raise NoiseSearchError(f"--resampling must be one of {', '.join(RESAMPLING)}, got {self.resampling!r}")
        if self.particles < 0:
            raise NoiseSearchError("--particles must be >= 0 (0 = fit to the budget)")
        if self.score_every < 0:
            raise NoiseSearchError("--score-every must be >= 0 (0 = chosen with the budget)")

    def describe(self, size: int) -> str:
        every = "" if self.score_every <= 1 else f", weighed at every {self.score_every}th decision point"
        return f"SMC with {size} particle(s){every}"

    def knobs(self) -> dict:
        return {"score_every": self.score_every}

    def decision_points(self, problem: Problem) -> int:
        """States a particle is weighed at with k = 1 (the state at each noise-injecting step; the
        finished state when no step injects noise)."""
        return max(1, len(noise_steps(problem.sampler)))

    def configurations(self, problem: Problem) -> list[tuple[Strategy, int]]:
        """k = 1, 2, ... with at least ``PARTICLE_TIERS[0]`` particles; where none of those is
        affordable, with the next tier's (resampling among 2 particles does little: thinning the
        weighings first keeps particles); below them all one particle, unscored."""
        if self.score_every:
            return [(self, 1)]
        every = [replace(self, score_every=k) for k in range(1, self.decision_points(problem) + 1)]
        if self.particles:
            return [(c, 1) for c in every]
        for tier in PARTICLE_TIERS:
            if any(problem.budget.affords(c.cost(problem, tier)) for c in every):
                return [(c, tier) for c in every]
        return [(every[0], 1)]

    def cost(self, problem: Problem, size: int) -> Cost:
        s, k = problem.sampler, size
        # a lone particle is never weighed
        weighings = sum(scored_decision(d, self.score_every) for d in range(self.decision_points(problem)))
        weighed = k * weighings if k > 1 else 0
        return problem.nfe_cost(k * s.nfe_per_trajectory) + problem.score_cost(weighed + k)

    def potential_increment(self, r: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-weight increment, new reference) for rewards ``r`` [P, K] of the particles now."""
        lam = self.potential_scale
        if self.potential == "diff":  # lambda (r_t - r_{t-1})
            return lam * (r - ref), r
        if self.potential == "max":  # lambda (max_{s<=t} r_s - max_{s<t} r_s)
            new_ref = torch.maximum(ref, r)
            return lam * (new_ref - ref), new_ref
        return lam * r, ref  # sum: lambda r_t

    def resample_low_ess(self, problem: Problem, state, log_w, r, ref):
        """Resample the particles of every search whose effective sample size fell below the
        threshold (their weights reset); returns (state, log_w, r, ref, searches resampled, mean ESS/K)."""
        P, K = log_w.shape
        ess = 1.0 / (torch.softmax(log_w, dim=1) ** 2).sum(1)
        low = ess < self.ess_threshold * K
        if K > 1 and bool(low.any()):
            ancestors = resample_indices(log_w, problem.noise, self.resampling)
            ancestors = torch.where(low.view(P, 1), ancestors, torch.arange(K).expand(P, K))
            rows = (ancestors + (torch.arange(P) * K).view(P, 1)).flatten()
            state = state.select(rows)
            r, ref = r.flatten()[rows].view(P, K), ref.flatten()[rows].view(P, K)
            log_w = torch.where(low.view(P, 1), torch.zeros_like(log_w), log_w)
        return state, log_w, r, ref, int(low.sum()) if K > 1 else 0, round(float(ess.mean()) / K, 3)

    def run(self, problem: Problem, size: int) -> SearchResult:
        s, P, K = problem.sampler, problem.num_searches, size
        weigh = K > 1  # one particle per search: its weight never matters, so nothing is scored on the way
        state = advance(s, problem.start(K))
        r = torch.zeros(P, K, dtype=torch.float64)
        if weigh and scored_decision(0, self.score_every):
            r = problem.score(state).view(P, K).double()
        log_w, ref = self.potential_scale * r, r.clone()  # ref: r_{t-1} (diff) or the running max (max)
        resamples, ess_trace, decision = 0, [], 0
        while True:
            state, log_w, r, ref, n, ess = self.resample_low_ess(problem, state, log_w, r, ref)
            resamples += n
            ess_trace.append(ess)
            if state.step >= s.num_steps:
                break
            state = advance(s, s.step(state, problem.noise.normal(state.owner)))
            if state.step >= s.num_steps:
                break
            decision += 1
            if weigh and scored_decision(decision, self.score_every):
                r = problem.score(state).view(P, K).double()
                increment, ref = self.potential_increment(r, ref)
                log_w = log_w + increment
        rewards = problem.score(state)
        best = best_per_owner(rewards, state.owner, P)
        return SearchResult(
            x0=state.x0[best.to(state.x0.device)],
            rewards=rewards[best],
            info={"particles": K, "score_every": self.score_every, "resamplings": resamples, "resampling_rate": round(resamples / max(1, P), 3),
                  "mean_relative_ess": ess_trace},
        )


__all__ = ["SMC", "resample_indices"]
