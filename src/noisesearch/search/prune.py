"""Live noise-aware pruning: ``ttsnap`` (prune with a noise-aware reward) and ``ttsp`` (prune with the
base reward), TTSnap (Yu et al., arXiv 2511.22242) run on a model instead of replayed on a pool.

Per search: start ``n`` candidates, as many as the budget affords under the ``exact`` cost model;
denoise them all in one batch; at each check step ``s_i`` score every alive candidate's Tweedie
estimate with the prune reward and keep the top ``keep_count(alive, a_i)``; denoise the survivors to
the end and return the one with the best final reward (the problem's reward).

Same rules as the simulator (``noisesearch.pruning``): check steps are pool step indices (the
estimate after ``sampler.start`` is step 0, the finished image step ``S - 1``; see
``noisesearch.sampling.samplers.step_layout``), ``keep_count`` rounds like the authors, ties go to the
lower candidate index, several prune rewards (``ranksum(a,b)``) are combined by rank sum, and the
number of starts is the largest ``n`` whose cost fits (``Budget.fit``). With ``pool_noise``
(default) candidate ``j`` of search ``(p, k)`` draws its noise from the per-candidate stream
``(seed, p, k, j)`` of :mod:`noisesearch.noise`; ``noisesearch pool`` uses ``(seed, p, 0, j)``, so
on a pool made with the same seed and prompts the simulator keeps exactly the candidates this
strategy keeps (tested).

Accounting: the plan is :func:`noisesearch.pruning.pruned_run_counts` (NFEs, prune-reward calls,
final reward calls), priced by the problem: NFEs at the denoiser's cost, each prune call at the
prune reward's own ``flops_per_image`` plus the decode of the estimate, each final call at the
final reward's. The checks are scored through ``Problem.score``, the one charging path, and a
check that would keep every candidate is skipped (no call), as in the ``exact`` model.

Pure: ``prune_reward`` is a ``Reward`` object (or None: the problem's own reward); names and folders
are resolved to rewards where names are resolved (``noisesearch.build``), never here. The setup
(layout, schedule, prune reward) is computed per call from the problem; nothing is cached on the
strategy and nothing is read from files.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from noisesearch.budget import Cost
from noisesearch.errors import NoiseSearchError
from noisesearch.pruning import (
    COST_MODELS,
    PruneSchedule,
    cost_per_start,
    keep_count,
    pruned_run_counts,
    published_schedule,
    select_top,
)
from noisesearch.rewards.base import is_noise_aware
from noisesearch.sampling.samplers import step_layout
from noisesearch.search.base import Problem, SearchResult, Strategy, best_per_owner


@dataclass
class _Setup:
    """What a pruning run on one problem needs (worked out per call, never cached)."""

    layout: dict
    schedule: PruneSchedule
    prune_reward: object
    parts: list
    trained_on: list


@dataclass
class _Prune(Strategy):
    name: ClassVar[str] = "prune"
    size_option: ClassVar[str] = "n_candidates"

    prune_steps: tuple[int, ...] = ()  # check steps (pool step indices); () = the paper's schedule mapped to the sampler
    keep: tuple[float, ...] = ()  # keep fractions, one per check step
    prune_reward: Any = None  # Reward scoring the checks (an object; names are resolved in build.py); None: the search's reward
    cost_model: str = "exact"  # exact (never over budget) or reference (the authors' sizing, capped to fit)
    n_candidates: int = 0  # starts per search; 0 = as many as the budget affords
    pool_noise: bool = True  # candidate j of search (p, k) uses the pool's noise stream (seed, p, k, j)

    def validate(self) -> None:
        if self.cost_model not in COST_MODELS:
            raise NoiseSearchError(f"unknown cost model {self.cost_model!r}; valid: {', '.join(COST_MODELS)}")
        if self.n_candidates < 0:
            raise NoiseSearchError("--n-candidates must be >= 0 (0 = from the budget)")
        if isinstance(self.prune_reward, (str, bytes)) or (self.prune_reward is not None and not callable(self.prune_reward)):
            raise NoiseSearchError(
                f"--prune-reward must be a Reward object (names and folders are resolved by noisesearch.build), got {self.prune_reward!r}"
            )

    def prune_reward_for(self, problem: Problem):
        """The reward scoring the checks: ``prune_reward``, or the problem's own reward when None."""
        return problem.reward if self.prune_reward is None else self.prune_reward

    def setup(self, problem: Problem) -> _Setup:
        """What a run on ``problem`` needs (computed on every call: nothing is cached on the strategy)."""
        s = problem.sampler
        layout = step_layout(s)
        S = len(layout["state_steps"])
        if not self.prune_steps and not self.keep:
            schedule = published_schedule(1, S)
        else:
            schedule = PruneSchedule(tuple(self.prune_steps), tuple(self.keep)).validate(S)
        reward = self.prune_reward_for(problem)
        parts = list(getattr(reward, "rewards", [reward]))
        trained_on = sorted({m["sampler"] for r in parts if is_noise_aware(r)
                             for m in [getattr(r, "manifest", {}) or {}] if m.get("sampler")})
        return _Setup(layout, schedule, reward, parts, trained_on)

    # -- planning --
    def describe(self, size: int) -> str:
        return f"{self.name} with {size} start(s)"

    def cost(self, problem: Problem, size: int) -> Cost:
        st = self.setup(problem)
        nfe, prune_calls, final_calls = pruned_run_counts(st.schedule, size, st.layout["nfe_at_step"],
                                                          problem.sampler.nfe_per_trajectory)
        return problem.nfe_cost(nfe) + problem.score_cost(prune_calls, st.prune_reward) + problem.score_cost(final_calls)

    def max_size(self, problem: Problem) -> int | None:
        """The ``reference`` model sizes like the authors (``int(room / cost_per_start)``), capped to fit."""
        budget = problem.budget
        if self.cost_model != "reference" or budget.flops_limit is None:
            return None
        st = self.setup(problem)
        S = len(st.layout["state_steps"])
        per_step = budget.cost.flops_per_nfe * problem.sampler.nfe_per_trajectory / S
        prune_flops = problem.score_cost(1, st.prune_reward).flops
        per = cost_per_start(st.schedule, S, per_step, [prune_flops], "reference")
        room = budget.flops_limit - float(budget.flops.max())
        return int(room / per) if per > 0 else None

    # -- search --
    def warn_other_sampler(self, st: _Setup, sampler_name: str) -> None:
        if any(t != sampler_name for t in st.trained_on):
            warnings.warn(
                f"the noise-aware prune reward was trained on {', '.join(st.trained_on)} pools but this run samples "
                f"with {sampler_name}: its scores are matched by noise level, but a checkpoint trained on {sampler_name} "
                f"pools (noisesearch pool --sampler {sampler_name}) will rank the candidates better",
                stacklevel=4,
            )

    def run(self, problem: Problem, size: int) -> SearchResult:
        st = self.setup(problem)
        s, P, n = problem.sampler, problem.num_searches, size
        self.warn_other_sampler(st, s.name)
        owner = torch.arange(P).repeat_interleave(n)
        cand = torch.arange(n).repeat(P)
        streams = problem.noise.candidates(owner.tolist(), cand.tolist()) if self.pool_noise else None
        rows = torch.arange(P * n)  # each alive row's stream

        def draw(state_owner):
            return streams.draw(rows) if streams is not None else problem.noise.normal(state_owner)

        def advance(state, until: int):
            while state.step < until:
                state = s.step(state, draw(state.owner) if s.uses_noise(state.step) else None)
            return state

        state = problem.start(n, draw(owner))
        alive, counts, survivors = n, [n], []
        for step, frac in zip(st.schedule.steps, st.schedule.keep):
            k = keep_count(alive, frac)
            if k == alive:  # keeps everyone: skipped, no reward call (the exact cost model)
                counts.append(k)
                survivors.append(cand.view(P, k).tolist())
                continue
            state = advance(state, st.layout["state_steps"][step])
            scores = problem.score(state, st.prune_reward, step=step, sigma=st.layout["sigmas"][step])
            pos = torch.as_tensor(select_top(scores.double().view(P, alive).numpy(), k, axis=1)).sort(dim=1).values
            keep_rows = (torch.arange(P).view(-1, 1) * alive + pos).flatten()  # candidate order kept
            state, rows, cand = state.select(keep_rows), rows[keep_rows], cand[keep_rows]
            alive = k
            counts.append(k)
            survivors.append(cand.view(P, k).tolist())
        state = advance(state, s.num_steps)
        final = problem.score(state)
        best = best_per_owner(final, state.owner, P)
        info = {
            "candidates": n,
            "schedule": st.schedule.as_dict(),
            "alive": counts,
            "survivors": survivors,
            "chosen": cand[best].tolist(),
            "prune_reward": getattr(st.prune_reward, "name", str(st.prune_reward)),
            "prune_reward_noise_aware": any(is_noise_aware(r) for r in st.parts),
            "prune_reward_trained_on_sampler": st.trained_on,
            "prune_flops_per_call": problem.score_cost(1, st.prune_reward).flops,
            "cost_model": self.cost_model,
            "noise": f"per-candidate streams, seed {problem.noise.seed}" if streams is not None else "per-search streams",
        }
        return SearchResult(x0=state.x0[best.to(state.x0.device)], rewards=final[best], info=info)


@dataclass
class TTSnap(_Prune):
    """Prune with a noise-aware reward: ``prune_reward`` is a trained noise-aware reward (``--prune-reward
    noise-aware@DIR``, resolved by ``noisesearch.build``); the default (None) prunes with the problem's own
    reward, like ``ttsp`` (the strategy reads no files)."""

    name: ClassVar[str] = "ttsnap"


@dataclass
class TTSp(_Prune):
    """Prune with the base reward (default: the problem's reward; ``--prune-reward`` to change it)."""

    name: ClassVar[str] = "ttsp"


__all__ = ["TTSnap", "TTSp", "step_layout"]
