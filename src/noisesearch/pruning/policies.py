"""Pruning policies the simulator replays (named so as not to collide with the search strategies).

A :class:`PrunePlan` is what one run does for one prompt: a pruning schedule, whether checks score
noise-aware rewards (TTSnap) or base rewards (TTSp), and, with several rewards, how they are
combined at a check (``rank``: the authors' rank sum; ``zsum``: the sum of each reward's z-score
among the alive candidates). A policy maps a budget to a plan; the simulator does the accounting.

* :class:`BestOfNPolicy` - no pruning.
* :class:`FixedPolicy` - one fixed plan at every budget (``ttsp`` / ``ttsnap`` and tuned schedules).
* :class:`BudgetAwarePolicy` - adaptive: the plan depends on the budget (budget-aware successive
  halving); built by :func:`noisesearch.simulate.tuning.tune` from the training prompts.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from noisesearch.errors import NoiseSearchError
from noisesearch.pruning.schedule import PruneSchedule
from noisesearch.pruning.select import AGGREGATES

NO_PRUNING = PruneSchedule((), ())


@dataclass(frozen=True)
class PrunePlan:
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
    def from_dict(cls, d: dict) -> "PrunePlan":
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


class Policy:
    name: str = "strategy"
    label: str = "strategy"

    def plan_for(self, budget: float) -> PrunePlan:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name, "label": self.label}


@dataclass
class BestOfNPolicy(Policy):
    name: str = "best-of-n"
    label: str = "Best-of-N"

    def plan_for(self, budget):
        return PrunePlan(NO_PRUNING)

    def describe(self):
        return {"name": self.name, "label": self.label, **PrunePlan(NO_PRUNING).as_dict()}


@dataclass
class FixedPolicy(Policy):
    """One fixed plan at every budget."""

    plan: PrunePlan = PrunePlan()
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
class BudgetAwarePolicy(Policy):
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
    def from_dict(cls, d: dict) -> "BudgetAwarePolicy":
        """Rebuild from :meth:`describe` output (e.g. in the JSON written by ``noisesearch tune``)."""
        try:
            rows = d["table"]
            return cls(tuple(float(r["budget_tflops"]) * 1e12 for r in rows), tuple(PrunePlan.from_dict(r) for r in rows))
        except (KeyError, TypeError, ValueError) as e:
            raise NoiseSearchError(f"not a budget-aware strategy description ({e})")
