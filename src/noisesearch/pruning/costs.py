"""What pruning costs: the ``exact`` and ``reference`` compute models, and ``CostSpec`` (a pool's
costs under one model) with which the simulator charges exactly what live generation charges.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from noisesearch.budget import FLOPS_RTOL, largest_affordable
from noisesearch.errors import NoiseSearchError
from noisesearch.pruning.schedule import PruneSchedule

COST_MODELS = ("exact", "reference")

# ---------------------------------------------------------------------------------------------
# cost
# ---------------------------------------------------------------------------------------------
def _reward_cost(flops_per_reward, model: str) -> float:
    """FLOPs charged for one "reward evaluation" of one image under a cost model.

    ``exact``: every reward model is paid (sum). ``reference``: the authors charge one evaluation
    whatever the number of reward models; we use the mean of their costs (1.2 TFLOPs for FLUX).
    """
    costs = np.atleast_1d(np.asarray(flops_per_reward, dtype=float))
    if costs.size == 0 or np.any(costs < 0):
        raise NoiseSearchError("reward costs must be given and non-negative")
    return float(costs.sum() if model == "exact" else costs.mean())


def _check_model(model: str) -> None:
    if model not in COST_MODELS:
        raise NoiseSearchError(f"unknown cost model {model!r}; valid cost models: {', '.join(COST_MODELS)}")


def best_of_n_cost(num_steps: int, flops_per_step: float, flops_per_reward, model: str = "exact") -> float:
    """FLOPs of one best-of-N candidate: all steps plus one reward call (same in both models)."""
    _check_model(model)
    return num_steps * float(flops_per_step) + _reward_cost(flops_per_reward, model)


def cost_per_start(schedule: PruneSchedule, num_steps: int, flops_per_step: float, flops_per_reward,
                   model: str = "exact") -> float:
    """Expected FLOPs per starting candidate with fractional alive shares ``f_i = a_1 ... a_i``.

    ``reference`` is the authors' formula (first stage ``s_1`` steps); ``exact`` charges ``s_1 + 1``
    (so a survivor pays all ``num_steps``) and every reward model. With no checks this is the
    best-of-N cost under both models.
    """
    _check_model(model)
    schedule.validate(num_steps)
    c, r = float(flops_per_step), _reward_cost(flops_per_reward, model)
    if not schedule.steps:
        return best_of_n_cost(num_steps, c, flops_per_reward, model)
    first = 1 if model == "exact" else 0
    cost, alive, last = 0.0, 1.0, 0
    for i, (s, a) in enumerate(zip(schedule.steps, schedule.keep)):
        cost += alive * ((s - last + (first if i == 0 else 0)) * c + r)
        alive *= a
        last = s
    cost += alive * ((num_steps - 1 - last) * c + r)
    return cost


def pruned_run_counts(schedule: PruneSchedule, n: int, nfe_at: list[int], nfe_total: int) -> tuple[int, int, int]:
    """(NFEs, prune-reward calls, final reward calls) of one search that starts ``n`` candidates.

    Integer survivor counts; a candidate pruned at check ``i`` has run ``nfe_at[s_i]`` NFEs, survivors
    run ``nfe_total``; a check that would keep every alive candidate is skipped (no reward call). The
    one formula behind the ``exact`` model, live pruning's plan and the simulator.
    """
    counts = schedule.survivors(n)
    nfe, prev, prune_calls = 0, 0, 0
    for i, s in enumerate(schedule.steps):
        nfe += counts[i] * (nfe_at[s] - prev)
        prev = nfe_at[s]
        if counts[i + 1] < counts[i]:
            prune_calls += counts[i]
    nfe += counts[-1] * (nfe_total - prev)
    return nfe, prune_calls, counts[-1]


def realised_cost(schedule: PruneSchedule, n: int, num_steps: int, flops_per_step: float, flops_per_reward,
                  model: str = "exact") -> float:
    """FLOPs actually spent on one prompt when ``n`` candidates start.

    ``exact``: integer survivor counts (what live generation pays, :func:`pruned_run_counts` with
    the estimate at step ``s`` costing ``s + 1`` steps). ``reference``: the authors' accounting,
    ``n * cost_per_start`` (what their budget axis assumes).
    """
    _check_model(model)
    if model == "reference":
        return n * cost_per_start(schedule, num_steps, flops_per_step, flops_per_reward, model)
    schedule.validate(num_steps)
    c, r = float(flops_per_step), _reward_cost(flops_per_reward, model)
    nfe, prune_calls, final_calls = pruned_run_counts(schedule, n, list(range(1, num_steps + 1)), num_steps)
    return nfe * c + (prune_calls + final_calls) * r


def starts_for_budget(budget: float, schedule: PruneSchedule, num_steps: int, flops_per_step: float,
                      flops_per_reward, model: str = "exact", max_starts: int | None = None) -> int:
    """How many candidates a per-prompt ``budget`` (FLOPs) lets a run start.

    ``reference``: ``int(budget / cost_per_start)`` as the authors do (the realised cost can then
    exceed the budget slightly because survivor counts are rounded). ``exact``: the largest ``n``
    whose :func:`realised_cost` is within the budget, so it never overshoots. ``max_starts`` caps
    the result (e.g. at the pool size). May return 0 when the budget buys nothing.
    """
    _check_model(model)
    per = cost_per_start(schedule, num_steps, flops_per_step, flops_per_reward, model)
    if per <= 0:
        raise NoiseSearchError("cost per candidate is zero: give positive FLOPs per step / per reward")
    guess = int(budget / per)  # the authors' rule, kept exactly for the reference model
    if model == "exact":
        def fits(m):
            within = realised_cost(schedule, m, num_steps, flops_per_step, flops_per_reward, model) <= budget * (1 + FLOPS_RTOL)
            return within and (max_starts is None or m <= max_starts)
        guess = largest_affordable(fits, 1)
    if max_starts is not None:
        guess = min(guess, int(max_starts))
    return max(guess, 0)


@dataclass(frozen=True)
class CostSpec:
    num_steps: int
    flops_per_step: float
    flops_per_reward: tuple[float, ...]
    model: str = "exact"

    def __post_init__(self):
        if self.model not in COST_MODELS:
            raise NoiseSearchError(f"unknown cost model {self.model!r}; valid cost models: {', '.join(COST_MODELS)}")
        if self.flops_per_step <= 0:
            raise NoiseSearchError(
                "the pool has no FLOPs per denoising step: give --flops-per-step (FLOPs of one step for one image)"
            )

    @classmethod
    def from_pool(cls, pool, rewards, model: str = "exact") -> "CostSpec":
        """Costs of ``rewards`` on ``pool``; a reward call includes decoding the estimate it scores
        (``pool.extra["flops_per_decode"]``, recorded for latent models; 0 for pixel models)."""
        decode = float(getattr(pool, "extra", {}).get("flops_per_decode", 0.0) or 0.0)
        return cls(pool.num_steps, pool.flops_per_step, tuple(pool.flops_per_reward[r] + decode for r in rewards), model)

    @property
    def best_of_n(self) -> float:
        """FLOPs of one best-of-N candidate."""
        return best_of_n_cost(self.num_steps, self.flops_per_step, self.flops_per_reward, self.model)

    def per_start(self, schedule: PruneSchedule) -> float:
        return cost_per_start(schedule, self.num_steps, self.flops_per_step, self.flops_per_reward, self.model)

    def realised(self, schedule: PruneSchedule, n: int) -> float:
        return realised_cost(schedule, n, self.num_steps, self.flops_per_step, self.flops_per_reward, self.model)

    def starts(self, budget: float, schedule: PruneSchedule, max_starts: int | None = None) -> int:
        return starts_for_budget(budget, schedule, self.num_steps, self.flops_per_step, self.flops_per_reward,
                                 self.model, max_starts)
