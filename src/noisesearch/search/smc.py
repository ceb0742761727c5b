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

Budget: ``particles=0`` (default) fits ``K`` to the budget: ``K`` full trajectories
(``K * sampler.nfe_per_trajectory`` NFEs) and one reward call per particle at every decision
point (each step that injects noise) plus a final one (with ``K = 1`` only the final one: a lone particle's weight never matters).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from noisesearch.budget import Cost
from noisesearch.errors import NoiseSearchError
from noisesearch.noise import NoiseSource
from noisesearch.search.base import Problem, SearchResult, Strategy, advance, best_per_owner, noise_steps

POTENTIALS = ("diff", "max", "sum")
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

    size_option = "particles"

    def validate(self) -> None:
        if self.potential not in POTENTIALS:
            raise NoiseSearchError(f"--potential must be one of {', '.join(POTENTIALS)}, got {self.potential!r}")
        if self.resampling not in RESAMPLING:
            raise NoiseSearchError(f"--resampling must be one of {', '.join(RESAMPLING)}, got {self.resampling!r}")
        if self.particles < 0:
            raise NoiseSearchError("--particles must be >= 0 (0 = fit to the budget)")

    def describe(self, size: int) -> str:
        return f"SMC with {size} particle(s)"

    def cost(self, problem: Problem, size: int) -> Cost:
        s, k = problem.sampler, size
        # particles are weighed at every decision point (the state at each noise-injecting step;
        # the finished state when no step injects noise); a lone particle is never weighed
        weighed = k * max(1, len(noise_steps(s))) if k > 1 else 0
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
        r = problem.score(state).view(P, K).double() if weigh else torch.zeros(P, K, dtype=torch.float64)
        log_w, ref = self.potential_scale * r, r.clone()  # ref: r_{t-1} (diff) or the running max (max)
        resamples, ess_trace = 0, []
        while True:
            state, log_w, r, ref, n, ess = self.resample_low_ess(problem, state, log_w, r, ref)
            resamples += n
            ess_trace.append(ess)
            if state.step >= s.num_steps:
                break
            state = advance(s, s.step(state, problem.noise.normal(state.owner)))
            if state.step >= s.num_steps:
                break
            if weigh:
                r = problem.score(state).view(P, K).double()
                increment, ref = self.potential_increment(r, ref)
                log_w = log_w + increment
        rewards = problem.score(state)
        best = best_per_owner(rewards, state.owner, P)
        return SearchResult(
            x0=state.x0[best.to(state.x0.device)],
            rewards=rewards[best],
            info={"particles": K, "resamplings": resamples, "resampling_rate": round(resamples / max(1, P), 3),
                  "mean_relative_ess": ess_trace},
        )


__all__ = ["SMC", "resample_indices"]
