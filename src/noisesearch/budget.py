"""Compute accounting: every network evaluation and reward call is charged to the search it serves.

A ``Budget`` covers ``num_searches`` independent searches (one per output sample). A limit is given
per search in NFEs (network function evaluations: one denoiser call on one sample row), in FLOPs
(network and reward FLOPs together), or both. Charges happen *before* the work runs and raise
``BudgetError`` if any search would go over: no strategy can exceed its budget silently.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from noisesearch.errors import BudgetError


@dataclass
class CostModel:
    """FLOPs of one network evaluation (one sample row) and of one reward call (one image)."""

    flops_per_nfe: float = 0.0
    flops_per_reward: float = 0.0

    def flops(self, nfe: float, reward_calls: float) -> float:
        return nfe * self.flops_per_nfe + reward_calls * self.flops_per_reward


class Budget:
    def __init__(
        self,
        num_searches: int,
        nfe: float | None = None,
        flops: float | None = None,
        cost: CostModel | None = None,
    ):
        if nfe is None and flops is None:
            raise BudgetError("give a budget: NFEs per sample (--budget-nfe) or FLOPs per sample (--budget-flops)")
        if nfe is not None and nfe <= 0 or flops is not None and flops <= 0:
            raise BudgetError("budgets must be positive")
        self.num_searches = num_searches
        self.nfe_limit = nfe
        self.flops_limit = flops
        self.cost = cost or CostModel()
        self.nfe = torch.zeros(num_searches, dtype=torch.long)
        self.reward_calls = torch.zeros(num_searches, dtype=torch.long)
        self.flops = torch.zeros(num_searches, dtype=torch.float64)
        self.listeners = []  # callables(kind, rows) notified after each charge (progress bars)

    # ---- planning ----------------------------------------------------------------------------
    def affords(self, nfe: float, reward_calls: float = 0) -> bool:
        """Whether one search may still spend ``nfe`` more NFEs and ``reward_calls`` more reward calls."""
        used_nfe = float(self.nfe.max()) if self.num_searches else 0.0
        used_flops = float(self.flops.max()) if self.num_searches else 0.0
        if self.nfe_limit is not None and used_nfe + nfe > self.nfe_limit + 1e-9:
            return False
        if self.flops_limit is not None:
            if used_flops + self.cost.flops(nfe, reward_calls) > self.flops_limit * (1 + 1e-12):
                return False
        return True

    def max_count(self, nfe_each: float, reward_each: float = 0) -> int:
        """Largest n such that one search can afford n units of (nfe_each, reward_each)."""
        counts = []
        if self.nfe_limit is not None and nfe_each > 0:
            counts.append((self.nfe_limit - float(self.nfe.max())) / nfe_each)
        if self.flops_limit is not None:
            unit = self.cost.flops(nfe_each, reward_each)
            if unit > 0:
                counts.append((self.flops_limit - float(self.flops.max())) * (1 + 1e-12) / unit)
        if not counts:
            raise BudgetError("cannot size the search: the budget does not constrain any cost it incurs")
        return max(0, int(math.floor(min(counts) + 1e-9)))

    # ---- charging ----------------------------------------------------------------------------
    def charge_nfe(self, owner: torch.Tensor) -> None:
        self._charge(owner, "nfe")

    def charge_reward(self, owner: torch.Tensor) -> None:
        self._charge(owner, "reward")

    def _charge(self, owner: torch.Tensor, kind: str) -> None:
        owner = owner.detach().to("cpu", torch.long)
        counts = torch.bincount(owner, minlength=self.num_searches)
        if kind == "nfe":
            new_nfe, new_calls = self.nfe + counts, self.reward_calls
            new_flops = self.flops + counts * self.cost.flops_per_nfe
        else:
            new_nfe, new_calls = self.nfe, self.reward_calls + counts
            new_flops = self.flops + counts * self.cost.flops_per_reward
        if self.nfe_limit is not None and float(new_nfe.max()) > self.nfe_limit + 1e-9:
            raise BudgetError(
                f"budget exceeded: a search would use {int(new_nfe.max())} NFEs, limit {self.nfe_limit:g}"
            )
        if self.flops_limit is not None and float(new_flops.max()) > self.flops_limit * (1 + 1e-12):
            raise BudgetError(
                f"budget exceeded: a search would use {float(new_flops.max()):.4g} FLOPs, limit {self.flops_limit:.4g}"
            )
        self.nfe, self.reward_calls, self.flops = new_nfe, new_calls, new_flops
        for listener in self.listeners:
            listener(kind, int(owner.numel()))

    # ---- reporting ---------------------------------------------------------------------------
    def summary(self) -> dict:
        return {
            "budget_nfe": self.nfe_limit,
            "budget_flops": self.flops_limit,
            "nfe_max": int(self.nfe.max()) if self.num_searches else 0,
            "nfe_mean": float(self.nfe.double().mean()) if self.num_searches else 0.0,
            "nfe_total": int(self.nfe.sum()),
            "reward_calls": int(self.reward_calls.sum()),
            "flops": float(self.flops.sum()),
            "flops_per_sample_max": float(self.flops.max()) if self.num_searches else 0.0,
            "flops_per_nfe": self.cost.flops_per_nfe,
            "flops_per_reward": self.cost.flops_per_reward,
        }
