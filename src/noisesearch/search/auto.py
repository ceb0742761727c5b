"""``auto``: pick the strategy and its hyperparameters from the budget and the reward's price.

Two numbers describe the regime of a problem:

* the **reward's price** in NFEs: what one reward call costs (the reward's FLOPs plus the decode of
  the estimate) over what one network evaluation costs, as the budget counts them. Under an NFE
  budget reward calls are not counted, so the price is 0; under a FLOP budget it is
  ``score_cost(1).flops / nfe_cost(1).flops``;
* the **budget in trajectories**: the NFE-equivalents the budget allows per search over the NFEs of
  one trajectory of the sampler (``nfe_per_trajectory``).

``TABLE`` maps the regime to the strategy that won it on the digits benchmark (judge accuracy,
``noisesearch bench search``, docs/search.md "Cost-aware search"), ties broken by the galaxy
benchmark (``noisesearch bench galaxies``): the row of the smallest measured price at least the
problem's (the most expensive row above it), and in it the largest measured budget at most the
problem's (the smallest below it). The chosen strategy is sized by the one sizer as if it
had been named (its knobs left to the budget), and ``strategy_info.auto`` says what was chosen.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from noisesearch.errors import NoiseSearchError
from noisesearch.search.base import Problem, SearchResult, Strategy
from noisesearch.search.beam import Beam
from noisesearch.search.rbf import RBF

#: reward price (NFEs per reward call) -> [(budget in trajectories, strategy class, options)], from the
#: digits benchmark tables in docs/search.md (the winner of each cell); where several strategies tie
#: on digits (judge accuracy 1.000), the winner of the galaxy benchmark's cell (docs/galaxies.md).
TABLE: dict[float, list[tuple[float, type[Strategy], dict[str, Any]]]] = {
    0.0: [(4, RBF, {}), (8, Beam, {}), (20, Beam, {})],
    0.25: [(4, RBF, {}), (8, Beam, {}), (20, Beam, {})],
    1.0: [(4, RBF, {}), (8, RBF, {}), (20, Beam, {})],
}


def reward_price(problem: Problem) -> float:
    """NFEs one reward call costs as the budget counts them (0 under an NFE budget)."""
    budget = problem.budget
    if budget.flops_limit is None:
        return 0.0
    nfe = problem.nfe_cost(1).flops
    return problem.score_cost(1).flops / nfe if nfe > 0 else float("inf")


def budget_in_trajectories(problem: Problem) -> float:
    """NFE-equivalents per search the budget still allows, over the NFEs of one trajectory."""
    b, traj = problem.budget, problem.sampler.nfe_per_trajectory
    room = []
    if b.nfe_limit is not None:
        room.append(b.nfe_limit - float(b.nfe.max()))
    if b.flops_limit is not None and problem.nfe_cost(1).flops > 0:
        room.append((b.flops_limit - float(b.flops.max())) / problem.nfe_cost(1).flops)
    return min(room) / traj if room else float("inf")


def table_choice(price: float, trajectories: float) -> tuple[type[Strategy], dict[str, Any]]:
    """The strategy (class, options) of the table cell for this regime."""
    prices = sorted(TABLE)
    row = TABLE[next((p for p in prices if p >= price), prices[-1])]
    fits = [cell for cell in row if cell[0] <= trajectories]
    _, cls, options = fits[-1] if fits else row[0]
    return cls, options


@dataclass
class Auto(Strategy):
    """The strategy the measured table names for the budget and the reward's price (module docstring)."""

    name = "auto"

    def choose(self, problem: Problem) -> Strategy:
        cls, options = table_choice(reward_price(problem), budget_in_trajectories(problem))
        return cls(**options)

    def plan(self, problem: Problem) -> tuple[Strategy, int]:
        chosen = self.choose(problem)
        chosen.validate()
        return chosen.plan(problem)

    def describe(self, size: int) -> str:
        return "auto (the table's strategy for this budget and reward price)"

    def search(self, problem: Problem) -> SearchResult:
        auto = {"strategy": self.choose(problem).name, "reward_price_nfe": round(reward_price(problem), 4),
                "budget_trajectories": round(budget_in_trajectories(problem), 3)}
        result = super().search(problem)
        result.info["auto"] = auto
        return result

    def cost(self, problem: Problem, size: int):
        raise NoiseSearchError("auto has no cost of its own: it runs the strategy it chooses (Auto.plan)")


__all__ = ["Auto", "TABLE", "reward_price", "budget_in_trajectories", "table_choice"]
