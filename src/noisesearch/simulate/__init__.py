"""Offline Monte Carlo simulation of test-time scaling strategies on reward pools.

* :mod:`.engine` - vectorised replay (``Replay``, ``simulate``) under the TTSnap authors' protocol;
* :mod:`.metrics` - AUC gain, best-of-N in closed form;
* :mod:`.tuning` - search of plans on training prompts, held-out report;
* :mod:`.report`, :mod:`.plots` - JSON and PNG of a simulation;
* :mod:`.options` - pool loading, prompt ranges and budget grids from plain values (the command-line
  flags live in :mod:`noisesearch.cli.simulate`);
* :mod:`.synthetic` - synthetic pools for tests and robustness checks.

The strategies and their costs (``PrunePlan``, ``BestOfNPolicy``, ``FixedPolicy``,
``BudgetAwarePolicy``, ``CostSpec``, ``published_schedule``) live in :mod:`noisesearch.pruning`
and are re-exported here.

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
