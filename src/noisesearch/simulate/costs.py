"""Cost specification of a simulation: pool metadata + the rewards used + a cost model.

Thin wrapper around the functions of :mod:`noisesearch.pruning`, so the simulator charges exactly
what live generation charges.
"""
from __future__ import annotations

from dataclasses import dataclass

from noisesearch.errors import NoiseSearchError
from noisesearch.pruning import (
    COST_MODELS,
    PruneSchedule,
    best_of_n_cost,
    cost_per_start,
    realised_cost,
    starts_for_budget,
)


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
        return cls(pool.num_steps, pool.flops_per_step, tuple(pool.flops_per_reward[r] for r in rewards), model)

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
