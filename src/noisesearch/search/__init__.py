"""Search strategies. Each is a dataclass of hyperparameters with ``search(problem)``.

``STRATEGIES`` maps CLI names to classes; ``make_strategy(name, **options)`` builds one and
rejects options it does not have.
"""
from __future__ import annotations

import dataclasses

from noisesearch.errors import NoiseSearchError, unknown_name
from noisesearch.search.auto import Auto
from noisesearch.search.base import Problem, SearchResult, Strategy, best_per_owner, topk_per_owner
from noisesearch.search.beam import Beam
from noisesearch.search.best_of_n import BestOfN, Naive
from noisesearch.search.dts import DTS
from noisesearch.search.eps_greedy import EpsGreedy, ZeroOrder
from noisesearch.search.evo import EvoSearch
from noisesearch.search.mcts import MCTS
from noisesearch.search.prune import TTSnap, TTSp
from noisesearch.search.rbf import RBF
from noisesearch.search.smc import SMC

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (Naive, BestOfN, EpsGreedy, ZeroOrder, Beam, MCTS, SMC, TTSnap, TTSp, EvoSearch, RBF, DTS, Auto)
}


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Add a strategy class under its ``name`` (a user's own strategy becomes a ``--strategy`` name)."""
    STRATEGIES[cls.name] = cls
    return cls


def make_strategy(name: str, **options) -> Strategy:
    """The strategy ``name`` with ``options`` (one-line NoiseSearchError for an unknown name or option)."""
    if name not in STRATEGIES:
        raise unknown_name("strategy", name, STRATEGIES)
    cls = STRATEGIES[name]
    valid = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(options) - valid)
    if bad:
        opts = ", ".join("--" + v.replace("_", "-") for v in sorted(valid)) or "none"
        raise NoiseSearchError(f"option(s) {', '.join('--' + b.replace('_', '-') for b in bad)} do not apply to strategy {name!r}; its options: {opts}")
    try:
        return cls(**options)
    except (TypeError, ValueError) as e:
        raise NoiseSearchError(f"bad options for strategy {name!r}: {e}") from None


__all__ = [
    "Problem", "SearchResult", "Strategy", "STRATEGIES", "make_strategy", "register_strategy", "best_per_owner",
    "topk_per_owner", "Naive", "BestOfN", "EpsGreedy", "ZeroOrder", "Beam", "MCTS", "SMC", "TTSnap", "TTSp", "EvoSearch", "RBF", "DTS", "Auto",
]
