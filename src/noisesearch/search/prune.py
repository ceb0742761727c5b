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
number of starts is ``noisesearch.pruning.starts_for_budget`` (the largest ``n`` whose realised
cost fits). With ``pool_noise`` (default) candidate ``j`` of search ``i`` draws its noise from the
stream ``(seed, i, j)`` that ``noisesearch pool`` uses, so on a pool made with the same seed and
prompts the simulator keeps exactly the candidates this strategy keeps (tested).

Accounting: NFEs are charged by the sampler as they run; each prune-reward call is charged at the
prune reward's own ``flops_per_image`` (which may differ from the final reward's): the budget only
knows one reward cost, so :func:`charge_reward_flops` charges through ``Budget.charge_reward`` with a
temporary cost model. The cost of ``n`` starts is :func:`live_cost`: the exact model's
``realised_cost`` generalised to a prune reward that costs differently from the final reward and to
samplers whose steps cost an uneven number of NFEs (for Euler-ancestral with equal reward costs it
is ``realised_cost`` itself).
"""
from __future__ import annotations

import warnings

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from noisesearch.budget import CostModel
from noisesearch.errors import BudgetError, NoiseSearchError
from noisesearch.search.base import Problem, SearchResult, Strategy, best_per_owner


# ---------------------------------------------------------------------------------------------
# accounting adapters
# ---------------------------------------------------------------------------------------------
def charge_reward_flops(budget, owner: torch.Tensor, flops_per_image: float) -> None:
    """Charge one reward call per row of ``owner`` at ``flops_per_image`` FLOPs each (limits checked)."""
    saved = budget.cost
    budget.cost = CostModel(saved.flops_per_nfe, float(flops_per_image))
    try:
        budget.charge_reward(owner)
    finally:
        budget.cost = saved


def live_cost(schedule, n: int, nfe_at: list[int], nfe_total: int, flops_per_nfe: float,
              prune_flops: float, final_flops: float) -> dict:
    """What ``n`` starts cost one search: NFEs, reward calls and FLOPs (exact, integer survivors).

    A candidate pruned at check ``i`` has run ``nfe_at[s_i]`` NFEs and ``i`` prune-reward calls;
    survivors run ``nfe_total`` NFEs, every check's prune call and one final reward call.
    """
    from noisesearch.pruning import realised_cost

    counts = schedule.survivors(n)
    nfe = 0
    prev = 0
    for i, s in enumerate(schedule.steps):
        nfe += counts[i] * (nfe_at[s] - prev)
        prev = nfe_at[s]
    nfe += counts[-1] * (nfe_total - prev)
    prune_calls = sum(counts[:-1])
    final_calls = counts[-1]
    flops = nfe * flops_per_nfe + prune_calls * prune_flops + final_calls * final_flops
    S = len(nfe_at)
    uniform = all(nfe_at[s] == s + 1 for s in range(S)) and nfe_total == S
    if uniform and prune_flops == final_flops:  # the simulator's exact cost model, literally
        flops = realised_cost(schedule, n, S, flops_per_nfe, [final_flops], "exact")
    return {"nfe": nfe, "prune_calls": prune_calls, "final_calls": final_calls, "flops": float(flops)}


def starts_for(limit: float, cost_of) -> int:
    """Largest ``n`` with ``cost_of(n) <= limit`` (``cost_of`` non-decreasing)."""
    if cost_of(1) > limit * (1 + 1e-12):
        return 0
    lo, hi = 1, 2
    while cost_of(hi) <= limit * (1 + 1e-12):
        lo, hi = hi, hi * 2
        if hi > 1 << 30:
            raise BudgetError("the budget affords an unbounded number of candidates: give a finite budget")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if cost_of(mid) <= limit * (1 + 1e-12):
            lo = mid
        else:
            hi = mid
    return lo


# ---------------------------------------------------------------------------------------------
# the strategies
# ---------------------------------------------------------------------------------------------
def _resolve_reward(spec: str, device):
    """A directory holding a noise-aware checkpoint, or any reward spec."""
    from noisesearch.rewards.base import make_reward
    from noisesearch.rewards.noise_aware import is_noise_aware_dir, load_noise_aware

    if is_noise_aware_dir(spec):
        return load_noise_aware(spec, device)
    if Path(spec).is_dir():
        return load_noise_aware(spec, device)  # raises a clear error (no manifest, unfinished training)
    return make_reward(spec, device=device)


@dataclass
class _Prune(Strategy):
    name: ClassVar[str] = "prune"
    noise_aware_default: ClassVar[bool] = False

    prune_steps: tuple[int, ...] = ()  # check steps (pool step indices); () = the paper's schedule mapped to the sampler
    keep: tuple[float, ...] = ()  # keep fractions, one per check step
    prune_reward: str = ""  # reward (spec, or a noise-aware checkpoint folder) scoring the checks
    cost_model: str = "exact"  # exact (never over budget) or reference (the authors' sizing, capped to fit)
    n_candidates: int = 0  # starts per search; 0 = as many as the budget affords
    pool_noise: bool = True  # candidate j of search i uses pool noise stream (seed, i, j)

    def schedule(self, num_steps: int):
        from noisesearch.pruning import PruneSchedule
        from noisesearch.simulate.strategies import published_schedule

        if not self.prune_steps and not self.keep:
            return published_schedule(1, num_steps)
        return PruneSchedule(tuple(self.prune_steps), tuple(self.keep)).validate(num_steps)

    def default_prune_reward(self, problem: Problem) -> str:
        return ""

    def load_prune_rewards(self, problem: Problem):
        from noisesearch.rewards.base import RankSum

        spec = self.prune_reward or self.default_prune_reward(problem)
        reward = problem.reward if not spec else _resolve_reward(spec, problem.sampler.denoiser.device)
        parts = list(reward.rewards) if isinstance(reward, RankSum) else [reward]
        return reward, parts

    def search(self, problem: Problem) -> SearchResult:
        from noisesearch.pools.generate import CandidateNoise, is_noise_aware, score_at_step, step_layout
        from noisesearch.pruning import COST_MODELS, cost_per_start, keep_count, select_rank_sum, select_top

        if self.cost_model not in COST_MODELS:
            raise NoiseSearchError(f"unknown cost model {self.cost_model!r}; valid: {', '.join(COST_MODELS)}")
        if self.n_candidates < 0:
            raise NoiseSearchError("--n-candidates must be >= 0 (0 = from the budget)")
        s = problem.sampler
        layout = step_layout(s)
        S = len(layout["state_steps"])
        schedule = self.schedule(S)
        prune_reward, parts = self.load_prune_rewards(problem)
        trained_on = sorted({m["sampler"] for r in parts if is_noise_aware(r)
                             for m in [getattr(r, "manifest", {}) or {}] if m.get("sampler")})
        if any(t != s.name for t in trained_on):
            warnings.warn(
                f"the noise-aware prune reward was trained on {', '.join(trained_on)} pools but this run samples "
                f"with {s.name}: its scores are matched by noise level, but a checkpoint trained on {s.name} "
                f"pools (noisesearch pool --sampler {s.name}) will rank the candidates better",
                stacklevel=2,
            )
        prune_flops = float(sum(float(getattr(r, "flops_per_image", 0.0)) for r in parts))
        final_flops = float(getattr(problem.reward, "flops_per_image", 0.0))
        budget = problem.budget
        F = float(budget.cost.flops_per_nfe)
        nfe_at, nfe_total = layout["nfe_at_step"], s.nfe_per_trajectory

        def cost(m: int) -> dict:
            return live_cost(schedule, m, nfe_at, nfe_total, F, prune_flops, final_flops)

        n = self.n_candidates
        sizing = {}
        if not n:
            limits = []
            if budget.nfe_limit is not None:
                limits.append(starts_for(budget.nfe_limit - float(budget.nfe.max()), lambda m: cost(m)["nfe"]))
            if budget.flops_limit is not None:
                room = budget.flops_limit - float(budget.flops.max())
                if self.cost_model == "reference":
                    per = cost_per_start(schedule, S, F * nfe_total / S, [prune_flops], "reference")
                    ref_n = int(room / per) if per > 0 else 0
                    fit = starts_for(room, lambda m: cost(m)["flops"])
                    sizing = {"reference_starts": ref_n, "capped_to_fit": ref_n > fit}
                    limits.append(min(ref_n, fit))
                else:
                    limits.append(starts_for(room, lambda m: cost(m)["flops"]))
            if not limits:
                raise BudgetError("give a budget: --budget-nfe or --budget-flops")
            n = min(limits)
        plan = cost(max(n, 1))
        if n < 1 or not budget.affords(plan["nfe"]) or (
            budget.flops_limit is not None and float(budget.flops.max()) + plan["flops"] > budget.flops_limit * (1 + 1e-12)
        ):
            one = cost(1)
            raise BudgetError(
                f"budget too small for {self.name}: {n or 1} start(s) need {plan['nfe']} NFEs"
                + (f" ({plan['flops']:.4g} FLOPs)" if budget.flops_limit is not None else "")
                + f" per sample; one candidate needs {one['nfe']} NFEs ({one['flops']:.4g} FLOPs)"
            )

        P = problem.num_searches
        gen = problem.generator
        owner = torch.arange(P).repeat_interleave(n)
        cand = torch.arange(n).repeat(P)
        noise_src = CandidateNoise(s, gen.initial_seed(), owner.tolist(), cand.tolist()) if self.pool_noise else None
        rows = torch.arange(P * n)  # each alive row's stream in noise_src

        def draw(m: int):
            return noise_src.draw(rows) if noise_src is not None else s.noise(m, gen)

        def advance(state, until: int):
            while state.step < until:
                z = draw(len(state)) if s.uses_noise(state.step) else None
                state = s.step(state, z)
            return state

        state = problem.start(n, draw(P * n))
        alive = n
        survivors, counts = [], [n]
        for step, frac in zip(schedule.steps, schedule.keep):
            state = advance(state, layout["state_steps"][step])
            images = problem.images(state)
            prompts = [problem.prompts[i] for i in state.owner.tolist()]
            charge_reward_flops(budget, state.owner, prune_flops)
            scores = [score_at_step(r, images, prompts, step, layout["sigmas"][step]).double().view(P, alive).numpy()
                      for r in parts]
            k = keep_count(alive, frac)
            pos = select_top(scores[0], k, axis=1) if len(scores) == 1 else select_rank_sum(scores, k, axis=1)
            pos = torch.as_tensor(pos).sort(dim=1).values  # keep candidate-index order within a search
            sel = (torch.arange(P).view(-1, 1) * alive + pos).flatten()
            state = state.select(sel)
            rows, cand = rows[sel], cand[sel]
            alive = k
            counts.append(k)
            survivors.append(cand.view(P, k).tolist())
        state = advance(state, s.num_steps)
        final = problem.score(state)
        best = best_per_owner(final, state.owner, P)
        spent = {"nfe": int(budget.nfe.max()), "flops": float(budget.flops.max())}
        info = {
            "candidates": n,
            "schedule": schedule.as_dict(),
            "alive": counts,
            "survivors": survivors,
            "chosen": cand[best].tolist(),
            "prune_reward": getattr(prune_reward, "name", str(prune_reward)),
            "prune_reward_noise_aware": any(is_noise_aware(r) for r in parts),
            "prune_reward_trained_on_sampler": trained_on,
            "prune_flops_per_image": prune_flops,
            "cost_model": self.cost_model,
            "planned": plan,
            "spent_per_sample_max": spent,
            "noise": f"pool streams, seed {gen.initial_seed()}" if noise_src is not None else "problem generator",
            **sizing,
        }
        return SearchResult(x0=state.x0[best], rewards=final[best], info=info)


@dataclass
class TTSnap(_Prune):
    """Prune with a noise-aware reward (``--prune-reward DIR``; default ``rewards/<reward>-noise-aware``)."""

    name: ClassVar[str] = "ttsnap"

    def default_prune_reward(self, problem: Problem) -> str:
        d = Path("rewards") / f"{problem.reward.name}-noise-aware"
        if not d.is_dir():
            raise NoiseSearchError(
                f"ttsnap prunes with a noise-aware reward: give --prune-reward DIR (made by `noisesearch train-reward "
                f"--pool POOL --reward {problem.reward.name} --out DIR`); the default {d} does not exist"
            )
        return str(d)


@dataclass
class TTSp(_Prune):
    """Prune with the base reward (default: the problem's reward; ``--prune-reward`` to change it)."""

    name: ClassVar[str] = "ttsp"


__all__ = ["TTSnap", "TTSp", "live_cost", "charge_reward_flops", "starts_for"]
