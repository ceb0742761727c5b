"""Inputs shared by ``noisesearch simulate`` and ``noisesearch tune``, from plain values: pool loading
with metadata overrides, reward lists, prompt ranges, budget grids and the memory estimate. (The
command-line flags themselves live in ``noisesearch.cli.simulate``.)"""
from __future__ import annotations

import re

import numpy as np

from noisesearch.errors import NoiseSearchError
from noisesearch.pools import Pool, load_pool
from noisesearch.pruning import CostSpec

_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "p": 1e15}


def parse_flops(text: str) -> float:
    """``9.9e12``, ``9.9T`` or ``9.9 TFLOPs`` -> 9.9e12."""
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([kKmMgGtTpP]?)(?:flops?|FLOPs?|FLOPS?)?\s*", text)
    try:
        if not m:
            raise ValueError
        value = float(m.group(1)) * _SUFFIX[m.group(2).lower()]
    except ValueError:
        raise NoiseSearchError(f"cannot read a FLOP count from {text!r}: use e.g. 9.9e12 or 9.9T")
    if not np.isfinite(value) or value < 0:
        raise NoiseSearchError(f"FLOP counts must be finite and >= 0, got {text!r}")
    return value


def parse_reward_flops(text: str, rewards) -> dict[str, float]:
    """``1.2T`` (every reward) or ``hps=1.2T,imr=0.8T``."""
    if "=" not in text:
        v = parse_flops(text)
        return {r: v for r in rewards}
    out = {}
    for part in text.split(","):
        if "=" not in part:
            raise NoiseSearchError(f"--flops-per-reward: expected NAME=FLOPS items, got {part!r}")
        name, value = part.split("=", 1)
        out[name.strip()] = parse_flops(value)
    return out


def parse_range(text: str | None, total: int, what: str = "prompts") -> slice:
    """``a:b`` (Python slice semantics, ``b`` excluded; either side may be empty) -> slice; checked
    against ``total``."""
    if text is None or text.strip() in ("", "all", ":"):
        return slice(0, total)
    m = re.fullmatch(r"\s*(\d*)\s*:\s*(\d*)\s*", text)
    if not m:
        raise NoiseSearchError(f"--{what}: expected a range START:STOP such as 0:100, got {text!r}")
    a = int(m.group(1)) if m.group(1) else 0
    b = int(m.group(2)) if m.group(2) else total
    if not 0 <= a < b <= total:
        raise NoiseSearchError(f"--{what} {text}: out of range, the pool has {total} prompts (use START:STOP within 0:{total})")
    return slice(a, b)


def parse_budget_values(text: str) -> np.ndarray:
    """``400:4000:200`` (START:STOP:STEP, STOP included) or ``400,800,1600`` -> values."""
    text = text.strip()
    try:
        if ":" in text:
            parts = [float(x) for x in text.split(":")]
            if len(parts) != 3 or parts[2] <= 0 or parts[1] < parts[0]:
                raise ValueError
            start, stop, step = parts
            if not all(np.isfinite(parts)):
                raise ValueError
            count = int(np.floor((stop - start) / step + 1e-9)) + 1
            if count > MAX_BUDGETS:
                raise NoiseSearchError(f"--budgets {text}: {count:,} budgets; at most {MAX_BUDGETS:,} "
                                       "(raise STEP, e.g. 400:4000:200)")
            values = start + step * np.arange(count)
        else:
            values = np.array([float(x) for x in text.split(",") if x.strip()])
            if len(values) > MAX_BUDGETS:
                raise NoiseSearchError(f"--budgets: {len(values):,} budgets; at most {MAX_BUDGETS:,}")
    except ValueError:
        raise NoiseSearchError(
            f"--budgets: expected START:STOP:STEP (e.g. 400:4000:200, STOP included) or a comma list, got {text!r}"
        ) from None
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise NoiseSearchError(f"--budgets {text}: budgets must be finite and > 0")
    return values


MAX_BUDGETS = 10_000


def simulation_bytes(iters: int, num_candidates: int, num_prompts: int, num_budgets: int, num_rewards: int,
                     num_methods: int) -> float:
    """Estimated peak memory (bytes) of ``simulate``: the subsets [iters, N] (int64), each method's
    per-iteration and per-prompt curves, and the engine's working chunk (about 4e6 rows per reward)."""
    subsets = 8.0 * iters * num_candidates
    curves = 8.0 * num_methods * num_budgets * num_rewards * (iters + num_prompts)
    working = 8.0 * 4e6 * num_rewards * 6
    return subsets + curves + working


def load_pool_rewards(pool: str, reward: str, pool_model: str | None = None, flops_per_step: str | None = None,
                      flops_per_reward: str | None = None) -> tuple[Pool, list[str]]:
    """Load the pool at ``pool`` (``pool_model``: the model prefix in a shared-layout folder), check
    the comma-separated ``reward`` names against it and apply the FLOP overrides (``9.9T``;
    ``flops_per_reward`` also ``NAME=VALUE,...``). Returns the pool and the reward names."""
    loaded = load_pool(pool, model=pool_model)
    rewards = [r.strip() for r in reward.split(",") if r.strip()]
    if not rewards:
        raise NoiseSearchError("--reward: give at least one reward name")
    if len(set(rewards)) != len(rewards):
        raise NoiseSearchError(f"--reward lists a reward twice: {reward}")
    for r in rewards:
        loaded.check_reward(r)
    if loaded.num_candidates < 2:
        raise NoiseSearchError(f"the pool at {pool} has {loaded.num_candidates} candidate per prompt: comparing "
                               "strategies needs at least 2 (make one with noisesearch pool --candidates N)")
    changes = {}
    if flops_per_step is not None:
        changes["flops_per_step"] = parse_flops(flops_per_step)
    if flops_per_reward is not None:
        fpr = parse_reward_flops(flops_per_reward, loaded.reward_names)
        for name in fpr:
            loaded.check_reward(name)
        changes["flops_per_reward"] = fpr
    if changes:
        loaded = loaded.with_metadata(**changes)
    return loaded, rewards


BUDGET_UNITS = ("tflops", "images")


def budget_grid(budgets: str | None, unit: str, cost: CostSpec, num_rewards: int) -> np.ndarray:
    """Budgets in FLOPs per prompt from a grid ``budgets`` (``START:STOP:STEP`` or a comma list; None:
    2..20 best-of-N candidates for one reward, 1..20 for several) in ``unit`` (``tflops`` per prompt,
    or ``images``: multiples of one best-of-N candidate's cost)."""
    if budgets is None:
        values = np.arange(2 if num_rewards == 1 else 1, 21, dtype=float)
        unit = "images"
    else:
        values = parse_budget_values(budgets)
    if unit not in BUDGET_UNITS:
        raise NoiseSearchError(f"--budget-unit {unit!r}: choose among {', '.join(BUDGET_UNITS)}")
    if unit == "images":
        # a hair above k candidates' cost so int(B / cost) is k despite rounding
        return values * cost.best_of_n * (1 + 1e-12)
    return values * 1e12
