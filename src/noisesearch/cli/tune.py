"""``noisesearch tune``: search pruning strategies on training prompts, report them on held-out ones.

Example::

    noisesearch tune --pool ../shared/data/ttsnap-flux --reward hps --train-prompts 0:100 \\
        --test-prompts 100:200 --cost-model exact --json out.json

The JSON holds the chosen strategy (``chosen``: ``tuned`` = the best fixed plan, or ``budget-aware``
= a plan per budget), its ``test_auc_gain`` on the held-out prompts (a number, or a dict per reward),
the paper's schedule evaluated the same way (``published``), and the search details. Replay a
result with ``noisesearch simulate --method tuned,budget-aware --from out.json``.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from noisesearch.cli.common import write_config_beside
from noisesearch.cli.simulate import add_pool_arguments, budget_args, load_pool_args
from noisesearch.errors import NoiseSearchError
from noisesearch.io import atomic_write_json
from noisesearch.validate import check_memory, int_in, output_file

# the command's line in `noisesearch --help` (read without building its parser)
HELP = "search pruning schedules / adaptive strategies on training prompts, report held-out AUC gain"


def add_parser(sub):
    p = sub.add_parser(
        "tune",
        help=HELP,
        description="Search pruning plans (number of checks, check steps, keep fractions, noise-aware or base "
        "scoring, multi-reward aggregation) and a budget-aware strategy on --train-prompts only; report the "
        "chosen strategy and the paper's schedule on --test-prompts under the same protocol.",
    )
    add_pool_arguments(p)
    p.add_argument("--train-prompts", required=True, help="prompt range used for the search, e.g. 0:100")
    p.add_argument("--test-prompts", default=None, help="held-out prompt range for the report, e.g. 100:200")
    p.add_argument("--explore", type=int_in(1, 10**6), default=150, help="random plans in the first stage (default 150)")
    p.add_argument("--iters-explore", type=int_in(1, 10**7), default=20, help="Monte Carlo iterations per plan while searching")
    p.add_argument("--iters-confirm", type=int_in(1, 10**7), default=96, help="iterations to confirm the finalists (fresh draws)")
    p.add_argument("--iters-test", type=int_in(1, 10**7), default=200, help="iterations for the held-out report")
    p.add_argument("--max-checks", type=int_in(0, 100), default=3, help="most checks in a plan (default 3)")
    p.add_argument("--json", default=None, help="write the result here (a file; FILE.config.yaml next to it holds every option)")
    p.add_argument("--plot", default=None, help="PNG of the held-out curves (needs --test-prompts)")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from noisesearch.simulate.tuning import TuneConfig, tune  # deferred: keeps `noisesearch --help` free of torch

    output_file(args.json, "--json", "tune")
    output_file(args.plot, "--plot")
    inp = _inputs(args)
    config = TuneConfig(explore=args.explore, iters_explore=args.iters_explore, iters_confirm=args.iters_confirm,
                        iters_test=args.iters_test, seed=args.seed, max_checks=args.max_checks)
    res = tune(inp.train, inp.test, inp.cost, inp.budgets, config, progress=not args.no_progress and sys.stderr.isatty())
    raw = _per_reward_layout(res, inp.rewards)
    out = _result(args, inp, res)
    _print_summary(out, inp.rewards)
    _write(args, inp, out, res, raw)
    return 0


def _prompt_ranges(args, pool):
    from noisesearch.simulate.options import parse_range  # deferred: keeps `noisesearch --help` free of torch

    train_sl = parse_range(args.train_prompts, pool.num_prompts, "train-prompts")
    test_sl = parse_range(args.test_prompts, pool.num_prompts, "test-prompts") if args.test_prompts else None
    if test_sl is not None and max(train_sl.start, test_sl.start) < min(train_sl.stop, test_sl.stop):
        raise NoiseSearchError("--train-prompts and --test-prompts overlap: held-out prompts must not be searched on")
    if args.plot and test_sl is None:
        raise NoiseSearchError("--plot needs --test-prompts")
    return train_sl, test_sl


@dataclass
class _Inputs:
    pool: Any
    rewards: list[str]
    train_range: slice
    test_range: slice | None
    train: Any  # Replay on the training prompts
    test: Any  # Replay on the held-out prompts, or None
    cost: Any
    budgets: Any  # FLOPs per prompt


def _inputs(args) -> _Inputs:
    """Pool, rewards, the train and held-out replays, cost model and budgets, checked before any work."""
    from noisesearch.pruning import CostSpec  # deferred: keeps `noisesearch --help` free of torch
    from noisesearch.simulate.engine import Replay, check_budgets  # deferred: keeps `noisesearch --help` free of torch
    from noisesearch.simulate.options import simulation_bytes  # deferred: keeps `noisesearch --help` free of torch

    pool, rewards = load_pool_args(args)
    train_sl, test_sl = _prompt_ranges(args, pool)
    cost = CostSpec.from_pool(pool, rewards, args.cost_model)
    budgets = check_budgets(budget_args(args, cost, len(rewards)), cost)
    iters = max(args.iters_explore, args.iters_confirm, args.iters_test)
    check_memory(simulation_bytes(iters, pool.num_candidates, pool.num_prompts, len(budgets), len(rewards), 4),
                 f"tune ({iters} iterations x {len(budgets)} budgets)", "--iters-explore/--iters-confirm/--iters-test or the number of --budgets")
    train = Replay(pool.select_prompts(train_sl), rewards)
    test = Replay(pool.select_prompts(test_sl), rewards) if test_sl is not None else None
    return _Inputs(pool, rewards, train_sl, test_sl, train, test, cost, budgets)


def _per_reward_layout(res: dict, rewards) -> dict:
    """Gains and curves of ``res`` rewritten per reward (a number for one reward, a dict for several),
    in place; returns the raw held-out curves [B, R] and gains for the plot."""
    from noisesearch.simulate.report import per_reward  # deferred: keeps `noisesearch --help` free of torch

    strategies = res["strategies"]
    raw = {"curves": {k: np.asarray(v["test_curve"]).T for k, v in strategies.items() if "test_curve" in v},
           "gains": {k: v.get("test_auc_gain") for k, v in strategies.items()}}
    for entry in strategies.values():
        for key in ("train_auc_gain", "test_auc_gain", "test_auc_gain_se"):
            if key in entry:
                entry[key] = per_reward(entry[key], rewards, 3)
        if "test_curve" in entry:
            entry["test_curve"] = per_reward(_transpose(entry["test_curve"]), rewards)
    for f in res["search"]["finalists"]:
        for key in ("train_auc_gain_explore", "train_auc_gain_confirm"):
            f[key] = per_reward(f[key], rewards, 3)
    return raw


def _result(args, inp: _Inputs, res: dict) -> dict:
    from noisesearch.simulate.report import per_reward  # deferred: keeps `noisesearch --help` free of torch

    strategies, chosen, rewards = res["strategies"], res["chosen"], inp.rewards
    train_sl, test_sl = inp.train_range, inp.test_range
    out = {
        "command": "tune",
        "pool": str(args.pool),
        "model": inp.pool.model,
        "rewards": rewards,
        "cost_model": args.cost_model,
        "train_prompts": [train_sl.start, train_sl.stop],
        "test_prompts": [test_sl.start, test_sl.stop] if test_sl else None,
        "budgets": [round(b / 1e12, 6) for b in inp.budgets],
        "budget_unit": "TFLOPs per prompt",
        "chosen": chosen,
        "strategy": {k: v for k, v in strategies[chosen].items() if not k.startswith(("test_", "train_"))},
        "train_auc_gain": strategies[chosen]["train_auc_gain"],
    }
    if inp.test is not None:
        out["test_auc_gain"] = strategies[chosen]["test_auc_gain"]
        if "published" in strategies:
            out["published_test_auc_gain"] = strategies["published"]["test_auc_gain"]
        out["best_of_n_test_curve"] = per_reward(_transpose(res["best_of_n_test_curve"]), rewards)
    out["strategies"] = strategies
    out["search"] = res["search"]
    return out


def _write(args, inp: _Inputs, out: dict, res: dict, raw: dict) -> None:
    """``--json`` (with its config beside) and ``--plot``."""
    if args.json:
        write_config_beside(args, args.json)
        atomic_write_json(args.json, out)
        print(f"wrote {args.json}")
    if args.plot:
        from noisesearch.simulate.plots import plot_curves  # deferred: keeps `noisesearch --help` free of torch

        curves = {"best-of-n": np.asarray(res["best_of_n_test_curve"]).T, **raw["curves"]}
        test_sl, pool = inp.test_range, inp.pool
        title = f"{pool.model}: {','.join(inp.rewards)}, {args.cost_model} cost, held-out prompts {test_sl.start}:{test_sl.stop}"
        plot_curves(args.plot, inp.budgets / 1e12, curves, inp.rewards, None, raw["gains"], pool.extra.get("display"), title)
        print(f"wrote {args.plot}")


def _transpose(rows):
    """[R][B] lists -> [B][R]."""
    return [list(x) for x in zip(*rows)]


def _print_summary(out, rewards):
    def fmt(g):
        if g is None:
            return "n/a"
        if isinstance(g, dict):
            return ", ".join(f"{r} {v:+.2f}%" if v is not None else f"{r} n/a" for r, v in g.items())
        return f"{g:+.2f}%"

    s = out["strategies"]
    print(f"{out['model']} {','.join(rewards)} ({out['cost_model']} cost): searched {out['search']['evaluated']} plans "
          f"on prompts {out['train_prompts'][0]}:{out['train_prompts'][1]}")
    for k in ("tuned", "budget-aware", "published"):
        if k not in s:
            continue
        e = s[k]
        desc = f"{e['method']} steps {e['steps']} keep {e['keep']}" + (f" ({e['aggregate']})" if len(rewards) > 1 else "") \
            if "table" not in e else f"{len({(tuple(r['steps']), tuple(r['keep'])) for r in e['table']})} plans over budgets"
        line = f"  {k:<13} {desc}\n  {'':<13} train {fmt(e['train_auc_gain'])}"
        if "test_auc_gain" in e:
            line += f" | held-out {fmt(e['test_auc_gain'])}"
        print(line)
    print(f"chosen: {out['chosen']}" + (f"; held-out AUC gain {fmt(out['test_auc_gain'])}" if "test_auc_gain" in out else ""))
