"""Command-line options shared by ``noisesearch simulate`` and ``noisesearch tune``: pool loading
with metadata overrides, reward lists, prompt ranges and budget grids."""
from __future__ import annotations

import argparse
import re

import numpy as np

from noisesearch.errors import NoiseSearchError
from noisesearch.pools import Pool, load_pool
from noisesearch.pruning import COST_MODELS, CostSpec
from noisesearch.validate import nonneg_int

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


def add_pool_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pool", required=True, help="pool folder (noisesearch-pool format or <model>_<reward>_<base|naft>.npy layout)")
    p.add_argument("--pool-model", default=None, help="model prefix to use when a shared-layout folder holds several")
    p.add_argument("--reward", required=True,
                   help="reward name, or several comma-separated (multi-reward: rank-sum selection), e.g. hps or imr,pic,hps")
    p.add_argument("--cost-model", default="exact", choices=COST_MODELS,
                   help="exact (default): every step and reward call paid; reference: the TTSnap authors' accounting")
    p.add_argument("--budgets", default=None,
                   help="budget grid per prompt: START:STOP:STEP (STOP included) or a comma list, in --budget-unit "
                        "(default: 2..20 best-of-N candidates for one reward, 1..20 for several)")
    p.add_argument("--budget-unit", default="tflops", choices=["tflops", "images"],
                   help="unit of --budgets: TFLOPs per prompt (default) or multiples of one best-of-N candidate's cost")
    p.add_argument("--flops-per-step", default=None, help="override the pool's FLOPs of one denoising step (e.g. 9.9e12 or 9.9T)")
    p.add_argument("--flops-per-reward", default=None,
                   help="override the FLOPs of one reward call: one value for all, or NAME=VALUE,... ")
    p.add_argument("--seed", type=nonneg_int, default=0, help="random seed of the Monte Carlo subsets (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (on a terminal a bar, otherwise a line every few seconds)")


def load_for_cli(args) -> tuple[Pool, list[str]]:
    """Load the pool, apply FLOP overrides, check the reward names."""
    pool = load_pool(args.pool, model=args.pool_model)
    rewards = [r.strip() for r in args.reward.split(",") if r.strip()]
    if not rewards:
        raise NoiseSearchError("--reward: give at least one reward name")
    if len(set(rewards)) != len(rewards):
        raise NoiseSearchError(f"--reward lists a reward twice: {args.reward}")
    for r in rewards:
        pool.check_reward(r)
    if pool.num_candidates < 2:
        raise NoiseSearchError(f"the pool at {args.pool} has {pool.num_candidates} candidate per prompt: comparing "
                               "strategies needs at least 2 (make one with noisesearch pool --candidates N)")
    changes = {}
    if args.flops_per_step is not None:
        changes["flops_per_step"] = parse_flops(args.flops_per_step)
    if args.flops_per_reward is not None:
        fpr = parse_reward_flops(args.flops_per_reward, pool.reward_names)
        for name in fpr:
            pool.check_reward(name)
        changes["flops_per_reward"] = fpr
    if changes:
        pool = pool.with_metadata(**changes)
    return pool, rewards


def budget_grid(args, cost: CostSpec, num_rewards: int) -> np.ndarray:
    """Budgets in FLOPs per prompt from ``--budgets`` / ``--budget-unit`` (or the default grid)."""
    if args.budgets is None:
        values = np.arange(2 if num_rewards == 1 else 1, 21, dtype=float)
        unit = "images"
    else:
        values = parse_budget_values(args.budgets)
        unit = args.budget_unit
    if unit == "images":
        # a hair above k candidates' cost so int(B / cost) is k despite rounding
        return values * cost.best_of_n * (1 + 1e-12)
    return values * 1e12
