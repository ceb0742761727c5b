"""Offline Monte Carlo simulation of test-time scaling strategies on reward pools.

* :mod:`.engine` - vectorised replay (``Replay``, ``simulate``) under the TTSnap authors' protocol;
* :mod:`.strategies` - ``PrunePlan`` (schedule + scoring + aggregation), ``BestOfNPolicy``, ``Prune``,
  ``BudgetAwarePolicy``;
* :mod:`.costs` - ``CostSpec`` (pool metadata + cost model, via :mod:`noisesearch.pruning`);
* :mod:`.metrics` - AUC gain, best-of-N in closed form;
* :mod:`.tuning` - search of plans on training prompts, held-out report;
* :mod:`.report`, :mod:`.plots`, :mod:`.options` - JSON, PNG and CLI helpers;
* :mod:`.synthetic` - synthetic pools for tests and robustness checks.

See docs/simulator.md.
"""
import importlib

_EXPORTS = {
    "Replay": "engine",
    "Simulation": "engine",
    "MethodResult": "engine",
    "simulate": "engine",
    "draw_subsets": "engine",
    "auc_gain": "metrics",
    "auc_gain_with_se": "metrics",
    "expected_best_of_n": "metrics",
}
_FROM_PRUNING = ("CostSpec", "PrunePlan", "BestOfNPolicy", "FixedPolicy", "BudgetAwarePolicy", "published_schedule")
__all__ = list(_EXPORTS) + list(_FROM_PRUNING)


def __getattr__(name):  # lazy: keeps ``noisesearch --help`` from importing scipy
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"noisesearch.simulate.{_EXPORTS[name]}"), name)
    if name in _FROM_PRUNING:  # pruning policies and costs live in noisesearch.pruning
        return getattr(importlib.import_module("noisesearch.pruning"), name)
    raise AttributeError(f"module 'noisesearch.simulate' has no attribute {name!r}")
