"""JSON-ready summaries of simulations.

Conventions of the JSON written by ``noisesearch simulate``: budgets are TFLOPs per prompt; with one
reward a curve is a list and a gain a number; with several rewards both are dicts keyed by reward.
"""
from __future__ import annotations

import math

import numpy as np

from noisesearch.simulate.engine import Simulation
from noisesearch.simulate.metrics import expected_best_of_n


def _num(x, digits=6):
    x = float(x)
    return round(x, digits) if math.isfinite(x) else None


def per_reward(values, rewards, digits=6):
    """[R] -> number (one reward) or {reward: number}; [B, R] -> list or {reward: list}."""
    a = np.asarray(values, float)
    if a.ndim == 1:
        out = {r: _num(v, digits) for r, v in zip(rewards, a)}
    else:
        out = {r: [_num(v, digits) for v in a[:, j]] for j, r in enumerate(rewards)}
    return out[rewards[0]] if len(rewards) == 1 else out


def simulation_report(sim: Simulation, replay=None) -> dict:
    """Budgets, each method's curve / standard error / starts / cost / AUC gain, best-of-N in closed
    form (one reward only: with several, best-of-N selects by rank sum and has no closed form)."""
    rewards = sim.rewards
    methods = {}
    for name, m in sim.methods.items():
        g, se = sim.gain(name)
        plans = {p for p in m.plans}
        entry = {
            **m.info,
            "curve": per_reward(m.curve, rewards),
            "stderr": per_reward(m.stderr, rewards),
            "starts": [int(n) for n in m.starts],
            "cost_tflops": [_num(c / 1e12) for c in m.cost],
            "auc_gain": per_reward(g, rewards, 3),
            "auc_gain_se": per_reward(se, rewards, 3),
        }
        if any(m.capped):
            entry["capped_at_pool_size"] = [bool(c) for c in m.capped]
        if len(plans) > 1:
            entry["plans"] = [p.as_dict() for p in m.plans]
        methods[name] = entry
    out = {
        "budgets": [_num(b / 1e12) for b in sim.budgets],
        "budget_unit": "TFLOPs per prompt",
        "rewards": rewards,
        "cost_model": sim.cost.model,
        "iters": sim.iters,
        "seed": sim.seed,
        "best_of_n_cost_tflops": _num(sim.cost.best_of_n / 1e12),
        "curves": {name: methods[name]["curve"] for name in methods},
        "methods": methods,
    }
    if replay is not None and len(rewards) == 1:
        starts = sim.methods[sim.baseline].starts
        out["best_of_n_closed_form"] = [_num(v) for v in expected_best_of_n(replay.final_values[0], starts)]
    others = [n for n in methods if n != sim.baseline]
    if not others:
        out["auc_gain"] = methods[sim.baseline]["auc_gain"]
    elif len(others) == 1:
        out["auc_gain"] = methods[others[0]]["auc_gain"]
    else:
        out["auc_gain"] = {n: methods[n]["auc_gain"] for n in others}
    return out
