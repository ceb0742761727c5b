"""Strategies the simulator replays.

A :class:`Plan` is what one run does for one prompt: a pruning schedule, whether checks score
noise-aware rewards (TTSnap) or base rewards (TTSp), and, with several rewards, how they are
combined at a check (``rank``: the authors' rank sum; ``zsum``: the sum of each reward's z-score
among the alive candidates). A strategy maps a budget to a plan; the engine does the accounting.

* :class:`BestOfN` - no pruning.
* :class:`Prune` - one fixed plan at every budget (``ttsp`` / ``ttsnap`` and tuned schedules).
* :class:`BudgetAware` - adaptive: the plan depends on the budget (budget-aware successive
  halving); built by :func:`noisesearch.simulate.tuning.tune` from the training prompts.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from noisesearch.errors import NoiseSearchError
from noisesearch.pruning import AGGREGATES, PruneSchedule

NO_PRUNING = PruneSchedule((), ())


@dataclass(frozen=True)
class Plan:
    schedule: PruneSchedule = NO_PRUNING
    noise_aware: bool = True
    aggregate: str = "rank"

    def __post_init__(self):
        if self.aggregate not in AGGREGATES:
            raise NoiseSearchError(f"unknown aggregate {self.aggregate!r}; valid: {', '.join(AGGREGATES)}")
        if not self.schedule.steps:  # normal form of best-of-N
            object.__setattr__(self, "noise_aware", False)
            object.__setattr__(self, "aggregate", "rank")

    @property
    def method(self) -> str:
        if not self.schedule.steps:
            return "best-of-n"
        return "ttsnap" if self.noise_aware else "ttsp"

    def as_dict(self) -> dict:
        return {"method": self.method, **self.schedule.as_dict(), "aggregate": self.aggregate}

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        try:
            return cls(PruneSchedule(tuple(d.get("steps", ())), tuple(d.get("keep", ()))),
                       d.get("method", "ttsnap") == "ttsnap", d.get("aggregate", "rank"))
        except (TypeError, ValueError, AttributeError) as e:
            raise NoiseSearchError(f"not a strategy description: {d!r} ({e})")

    def __str__(self) -> str:
        if not self.schedule.steps:
            return "Best-of-N"
        kind = "TTSnap" if self.noise_aware else "TTSp"
        agg = ", z-sum" if self.aggregate == "zsum" else ""
        return f"{kind} [{self.schedule}{agg}]"


class Strategy:
    name: str = "strategy"
    label: str = "strategy"

    def plan_for(self, budget: float) -> Plan:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name, "label": self.label}


@dataclass
class BestOfN(Strategy):
    name: str = "best-of-n"
    label: str = "Best-of-N"

    def plan_for(self, budget):
        return Plan(NO_PRUNING)

    def describe(self):
        return {"name": self.name, "label": self.label, **Plan(NO_PRUNING).as_dict()}


@dataclass
class Prune(Strategy):
    """One fixed plan at every budget."""

    plan: Plan = Plan()
    name: str = "ttsnap"
    label: str = ""

    def __post_init__(self):
        if not self.label:
            self.label = str(self.plan)

    def plan_for(self, budget):
        return self.plan

    def describe(self):
        return {"name": self.name, "label": self.label, **self.plan.as_dict()}


@dataclass
class BudgetAware(Strategy):
    """Adaptive: a plan per budget, looked up at the nearest budget (in log budget) of a table."""

    budgets: tuple = ()
    plans: tuple = ()
    name: str = "budget-aware"
    label: str = "budget-aware plan"

    def __post_init__(self):
        if not self.budgets or len(self.budgets) != len(self.plans):
            raise NoiseSearchError("a budget-aware strategy needs one plan per budget")

    def plan_for(self, budget):
        i = int(np.argmin(np.abs(np.log(np.asarray(self.budgets, float)) - np.log(budget))))
        return self.plans[i]

    def describe(self):
        return {"name": self.name, "label": self.label,
                "table": [{"budget_tflops": b / 1e12, **p.as_dict()} for b, p in zip(self.budgets, self.plans)]}

    @classmethod
    def from_dict(cls, d: dict) -> "BudgetAware":
        """Rebuild from :meth:`describe` output (e.g. in the JSON written by ``noisesearch tune``)."""
        try:
            rows = d["table"]
            return cls(tuple(float(r["budget_tflops"]) * 1e12 for r in rows), tuple(Plan.from_dict(r) for r in rows))
        except (KeyError, TypeError, ValueError) as e:
            raise NoiseSearchError(f"not a budget-aware strategy description ({e})")


def published_schedule(num_rewards: int, num_steps: int) -> PruneSchedule:
    """The TTSnap paper's hand-tuned schedules (for 20 steps), mapped to ``num_steps`` by position.

    Single reward: steps [2, 6, 11], keep [0.4, 0.4, 0.5]. Multi-reward: steps [4, 6, 11], keep
    [0.4, 0.5, 0.6]. For another step count the check positions keep their fraction of the
    trajectory (``s / 19``).
    """
    steps, keep = ((2, 6, 11), (0.4, 0.4, 0.5)) if num_rewards == 1 else ((4, 6, 11), (0.4, 0.5, 0.6))
    if num_steps == 20:
        return PruneSchedule(steps, keep)
    return PruneSchedule.from_fractions([s / 19 for s in steps], keep, num_steps)
