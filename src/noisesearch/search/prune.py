"""Live noise-aware pruning: ``ttsnap`` (prune with a noise-aware reward) and ``ttsp`` (prune with the
base reward), TTSnap (Yu et al., arXiv 2511.22242) run on a model instead of replayed on a pool.

Per search: start ``n`` candidates, as many as the budget affords under the ``exact`` cost model;
denoise them all in one batch; at each check step ``s_i`` score every alive candidate's Tweedie
estimate with the prune reward and keep the top ``keep_count(alive, a_i)``; denoise the survivors to
the end and return the one with the best final reward (the problem's reward).

Same rules as the simulator (``noisesearch.pruning``): check steps are pool step indices (the
estimate after ``sampler.start`` is step 0, the finished image step ``S - 1``; see
``noisesearch.pools.generate.step_layout``), ``keep_count`` rounds like the authors, ties go to the
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
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

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


def resolve_prune_reward(spec: str, device):
    """A directory holding a noise-aware checkpoint, or any reward spec."""
    from noisesearch.rewards.base import make_reward
    from noisesearch.rewards.noise_aware import is_noise_aware_dir, load_noise_aware

    looks_like_path = "@" not in spec and ("/" in spec or spec.startswith((".", "~")))
    if is_noise_aware_dir(spec) or Path(spec).is_dir() or looks_like_path:
        return load_noise_aware(spec, device)  # a folder without a finished manifest gets a clear error
    return make_reward(spec, device=device)


@dataclass
class _Setup:
    """What a pruning run needs, worked out once per problem."""

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
    prune_reward: str = ""  # reward scoring the checks: a reward spec, e.g. noise-aware@DIR (a train-reward checkpoint folder); default: the search's reward
    cost_model: str = "exact"  # exact (never over budget) or reference (the authors' sizing, capped to fit)
    n_candidates: int = 0  # starts per search; 0 = as many as the budget affords
    pool_noise: bool = True  # candidate j of search (p, k) uses the pool's noise stream (seed, p, k, j)

    def validate(self) -> None:
        if self.cost_model not in COST_MODELS:
            raise NoiseSearchError(f"unknown cost model {self.cost_model!r}; valid: {', '.join(COST_MODELS)}")
        if self.n_candidates < 0:
            raise NoiseSearchError("--n-candidates must be >= 0 (0 = from the budget)")

    def default_prune_reward(self, problem: Problem) -> str:
        return ""

    def setup(self, problem: Problem) -> _Setup:
        cached = getattr(self, "_setup", None)
        if cached is not None and cached[0] is problem:
            return cached[1]
        s = problem.sampler
        layout = step_layout(s)
        S = len(layout["state_steps"])
        if not self.prune_steps and not self.keep:
            schedule = published_schedule(1, S)
        else:
            schedule = PruneSchedule(tuple(self.prune_steps), tuple(self.keep)).validate(S)
        spec = self.prune_reward or self.default_prune_reward(problem)
        reward = problem.reward if not spec else resolve_prune_reward(spec, problem.denoiser.device)
        parts = list(getattr(reward, "rewards", [reward]))
        trained_on = sorted({m["sampler"] for r in parts if is_noise_aware(r)
                             for m in [getattr(r, "manifest", {}) or {}] if m.get("sampler")})
        if any(t != s.name for t in trained_on):
            warnings.warn(
                f"the noise-aware prune reward was trained on {', '.join(trained_on)} pools but this run samples "
                f"with {s.name}: its scores are matched by noise level, but a checkpoint trained on {s.name} "
                f"pools (noisesearch pool --sampler {s.name}) will rank the candidates better",
                stacklevel=3,
            )
        setup = _Setup(layout, schedule, reward, parts, trained_on)
        self._setup = (problem, setup)
        return setup

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
    def run(self, problem: Problem, size: int) -> SearchResult:
        st = self.setup(problem)
        s, P, n = problem.sampler, problem.num_searches, size
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
    """Prune with a noise-aware reward (``--prune-reward noise-aware@DIR``; default ``rewards/<reward>-noise-aware``)."""

    name: ClassVar[str] = "ttsnap"

    def default_prune_reward(self, problem: Problem) -> str:
        d = Path("rewards") / f"{problem.reward.name}-noise-aware"
        if not d.is_dir():
            raise NoiseSearchError(
                f"ttsnap prunes with a noise-aware reward: give --prune-reward noise-aware@DIR (DIR made by `noisesearch train-reward "
                f"--pool POOL --reward {problem.reward.name} --out DIR`); the default {d} does not exist"
            )
        return str(d)


@dataclass
class TTSp(_Prune):
    """Prune with the base reward (default: the problem's reward; ``--prune-reward`` to change it)."""

    name: ClassVar[str] = "ttsp"


__all__ = ["TTSnap", "TTSp", "step_layout", "resolve_prune_reward"]
