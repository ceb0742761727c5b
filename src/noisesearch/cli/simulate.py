"""``noisesearch simulate``: replay strategies on a reward pool and compare them with best-of-N.

Example (the TTSnap authors' protocol)::

    noisesearch simulate --pool ../shared/data/ttsnap-flux --reward hps --method ttsnap \\
        --steps 2,6,11 --keep 0.4,0.4,0.5 --budgets 400:4000:200 --iters 50 \\
        --cost-model reference --prompts 0:200 --json out.json
"""
from __future__ import annotations

import json
import sys

from noisesearch.cli.common import write_config_beside
from noisesearch.errors import NoiseSearchError, unknown_name
from noisesearch.io import atomic_write_json, read_text_limited
from noisesearch.validate import check_memory, int_in, nonneg_int, output_file

METHODS = ("best-of-n", "ttsp", "ttsnap", "tuned", "budget-aware")


def add_pool_arguments(p) -> None:
    """The pool, reward, cost and budget flags shared by ``simulate`` and ``tune``."""
    from noisesearch.pruning import COST_MODELS  # deferred: torch; only this command's parser needs it
    from noisesearch.simulate.options import BUDGET_UNITS  # deferred: torch; only this command's parser needs it

    p.add_argument("--pool", required=True, help="pool folder (noisesearch-pool format or <model>_<reward>_<base|naft>.npy layout)")
    p.add_argument("--pool-model", default=None, help="model prefix to use when a shared-layout folder holds several")
    p.add_argument("--reward", required=True,
                   help="reward name, or several comma-separated (multi-reward: rank-sum selection), e.g. hps or imr,pic,hps")
    p.add_argument("--cost-model", default="exact", choices=COST_MODELS,
                   help="exact (default): every step and reward call paid; reference: the TTSnap authors' accounting")
    p.add_argument("--budgets", default=None,
                   help="budget grid per prompt: START:STOP:STEP (STOP included) or a comma list, in --budget-unit "
                        "(default: 2..20 best-of-N candidates for one reward, 1..20 for several)")
    p.add_argument("--budget-unit", default="tflops", choices=BUDGET_UNITS,
                   help="unit of --budgets: TFLOPs per prompt (default) or multiples of one best-of-N candidate's cost")
    p.add_argument("--flops-per-step", default=None, help="override the pool's FLOPs of one denoising step (e.g. 9.9e12 or 9.9T)")
    p.add_argument("--flops-per-reward", default=None,
                   help="override the FLOPs of one reward call: one value for all, or NAME=VALUE,... ")
    p.add_argument("--seed", type=nonneg_int, default=0, help="random seed of the Monte Carlo subsets (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (on a terminal a bar, otherwise a line every few seconds)")


def load_pool_args(args):
    """The pool and reward names from the pool flags (``simulate.options.load_pool_rewards``)."""
    from noisesearch.simulate.options import load_pool_rewards  # deferred: keeps `noisesearch --help` free of torch

    return load_pool_rewards(args.pool, args.reward, args.pool_model, args.flops_per_step, args.flops_per_reward)


def budget_args(args, cost, num_rewards: int):
    """Budgets in FLOPs per prompt from ``--budgets`` / ``--budget-unit``."""
    from noisesearch.simulate.options import budget_grid  # deferred: keeps `noisesearch --help` free of torch

    return budget_grid(args.budgets, args.budget_unit, cost, num_rewards)


# the command's line in `noisesearch --help` (read without building its parser)
HELP = "Monte Carlo replay of strategies (best-of-N, TTSp, TTSnap, tuned) on a reward pool"


def add_parser(sub):
    from noisesearch.pruning import AGGREGATES  # deferred: torch; only this command's parser needs it

    p = sub.add_parser(
        "simulate",
        help=HELP,
        description="Replay strategies on a reward pool under a compute model; report reward-vs-budget curves "
        "and the relative AUC gain over best-of-N (the TTSnap paper's protocol).",
    )
    add_pool_arguments(p)
    p.add_argument("--method", default="ttsnap",
                   help="comma-separated methods: best-of-n, ttsp, ttsnap (with --steps/--keep), tuned and "
                        "budget-aware (from a 'noisesearch tune' JSON given by --from); best-of-n is always included")
    p.add_argument("--steps", default=None,
                   help="check steps for ttsp/ttsnap, e.g. 2,6,11 (default: the paper's schedule for the reward setting)")
    p.add_argument("--keep", default=None, help="keep fraction at each check, e.g. 0.4,0.4,0.5")
    p.add_argument("--aggregate", default="rank", choices=AGGREGATES,
                   help="multi-reward pruning: rank sum (default, the paper's) or z-score sum")
    p.add_argument("--from", dest="from_json", default=None,
                   help="JSON written by 'noisesearch tune' (for --method tuned / budget-aware)")
    p.add_argument("--iters", type=int_in(1, 10**7), default=50, help="Monte Carlo iterations (default 50; memory grows with it: checked before the run)")
    p.add_argument("--prompts", default=None, help="prompt range START:STOP (default: all)")
    p.add_argument("--json", default=None, help="write the results as JSON here (a file; FILE.config.yaml next to it holds every option)")
    p.add_argument("--plot", default=None, help="write a reward-vs-budget PNG here (a file)")
    p.set_defaults(func=run)
    return p


def build_strategies(args, pool, rewards):
    """Strategy objects for ``--method``, plus warnings to report."""
    # deferred: keeps `noisesearch --help` free of torch
    from noisesearch.pruning import (
        BestOfNPolicy,
        BudgetAwarePolicy,
        FixedPolicy,
        PrunePlan,
        PruneSchedule,
        published_schedule,
    )

    names = [m.strip() for m in args.method.split(",") if m.strip()]
    if not names:
        raise NoiseSearchError("--method: give at least one method")
    warnings = []
    strategies = []
    tuned = None
    for name in names:
        if name not in METHODS:
            raise unknown_name("method", name, METHODS)
        if name == "best-of-n":
            strategies.append(BestOfNPolicy())
        elif name in ("ttsp", "ttsnap"):
            if (args.steps is None) != (args.keep is None):
                raise NoiseSearchError("give --steps and --keep together (or neither for the paper's schedule)")
            if args.steps is None:
                schedule = published_schedule(len(rewards), pool.num_steps)
            else:
                schedule = PruneSchedule.parse(args.steps, args.keep)
            schedule.validate(pool.num_steps)
            na = name == "ttsnap"
            if na:
                missing = [r for r in rewards if not pool.has_noise_aware(r)]
                if missing:
                    warnings.append(f"ttsnap: no noise-aware scores for {', '.join(missing)}; those use base rewards (TTSp)")
            strategies.append(FixedPolicy(PrunePlan(schedule, na, args.aggregate), name))
        else:
            if args.from_json is None:
                raise NoiseSearchError(f"--method {name} needs --from TUNE.json (written by 'noisesearch tune')")
            if tuned is None:
                try:  # bounded and UTF-8 (io.read_text_limited raises a one-line NoiseSearchError)
                    tuned = json.loads(read_text_limited(args.from_json, "--from", max_bytes=64 * 2**20))
                except json.JSONDecodeError as e:
                    raise NoiseSearchError(f"cannot read {args.from_json}: {e}")
            try:
                entry = tuned["strategies"][name]
            except (KeyError, TypeError):
                raise NoiseSearchError(f"{args.from_json} has no '{name}' strategy (is it a 'noisesearch tune' JSON?)")
            if tuned.get("rewards") and list(tuned["rewards"]) != rewards:
                warnings.append(f"{name}: tuned for rewards {tuned['rewards']}, used with {rewards}")
            if name == "tuned":
                strategies.append(FixedPolicy(PrunePlan.from_dict(entry), "tuned"))
            else:
                strategies.append(BudgetAwarePolicy.from_dict(entry))
    return strategies, warnings


def run(args) -> int:
    from noisesearch.simulate.engine import Replay, simulate  # deferred: keeps `noisesearch --help` free of torch
    from noisesearch.simulate.report import simulation_report  # deferred: keeps `noisesearch --help` free of torch

    output_file(args.json, "--json", "simulate")
    output_file(args.plot, "--plot")
    pool, rewards, sl, budgets, cost = _inputs(args)
    sub = pool.select_prompts(sl)
    strategies, warnings = build_strategies(args, pool, rewards)
    _check_memory(args, pool, sub, budgets, rewards, strategies)
    replay = Replay(sub, rewards)
    sim = simulate(replay, strategies, budgets, cost, iters=args.iters, seed=args.seed,
                   progress=not args.no_progress and sys.stderr.isatty())
    capped = [n for n, m in sim.methods.items() if any(m.capped)]
    if capped:
        warnings.append(f"{', '.join(capped)}: the pool's {pool.num_candidates} candidates cap the starts at some budgets")
    out = _result(args, pool, rewards, sl, sub, simulation_report(sim, replay), warnings)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    _print_summary(out, rewards)
    _write(args, out, pool, sub, sim, rewards)
    return 0


def _inputs(args):
    """Pool, reward names, prompt range, budgets (FLOPs) and cost model, checked."""
    from noisesearch.pruning import CostSpec  # deferred: keeps `noisesearch --help` free of torch
    from noisesearch.simulate.engine import check_budgets  # deferred: keeps `noisesearch --help` free of torch
    from noisesearch.simulate.options import parse_range  # deferred: keeps `noisesearch --help` free of torch

    pool, rewards = load_pool_args(args)
    sl = parse_range(args.prompts, pool.num_prompts, "prompts")
    cost = CostSpec.from_pool(pool, rewards, args.cost_model)
    budgets = check_budgets(budget_args(args, cost, len(rewards)), cost)
    return pool, rewards, sl, budgets, cost


def _check_memory(args, pool, sub, budgets, rewards, strategies) -> None:
    from noisesearch.simulate.options import simulation_bytes  # deferred: keeps `noisesearch --help` free of torch

    check_memory(simulation_bytes(args.iters, pool.num_candidates, sub.num_prompts, len(budgets), len(rewards),
                                  len(strategies) + 1), f"simulate ({args.iters} iterations x {len(budgets)} budgets)",
                 "--iters or the number of --budgets")


def _result(args, pool, rewards, sl, sub, report, warnings) -> dict:
    return {
        "command": "simulate",
        "pool": str(args.pool),
        "model": pool.model,
        "prompts": [sl.start, sl.stop],
        "num_prompts": sub.num_prompts,
        "num_candidates": pool.num_candidates,
        "num_steps": pool.num_steps,
        "flops_per_step": pool.flops_per_step,
        "flops_per_reward": {r: pool.flops_per_reward[r] for r in rewards},
        **report,
        "warnings": warnings,
    }


def _write(args, out, pool, sub, sim, rewards) -> None:
    """``--json`` (with its config beside) and ``--plot``."""
    if args.json:
        write_config_beside(args, args.json)
        atomic_write_json(args.json, out)
        print(f"wrote {args.json}")
    if args.plot:
        from noisesearch.simulate.plots import plot_curves  # deferred: keeps `noisesearch --help` free of torch

        curves = {n: m.curve for n, m in sim.methods.items()}
        stderr = {n: m.stderr for n, m in sim.methods.items()}
        gains = {n: list(sim.gain(n)[0]) for n in sim.methods}
        title = f"{pool.model}: {','.join(rewards)}, {args.cost_model} cost, {sub.num_prompts} prompts, {args.iters} iterations"
        plot_curves(args.plot, sim.budgets / 1e12, curves, rewards, stderr, gains, pool.extra.get("display"), title)
        print(f"wrote {args.plot}")


def _print_summary(out, rewards):
    print(f"{out['model']}: {out['num_prompts']} prompts x {out['num_candidates']} candidates x {out['num_steps']} steps; "
          f"cost model {out['cost_model']}; budgets {out['budgets'][0]:g}..{out['budgets'][-1]:g} TFLOPs; "
          f"{out['iters']} iterations")
    head = f"{'method':<16}{'starts':>10}  " + "  ".join(f"{'AUC ' + r:>16}" for r in rewards)
    print(head)
    for name, m in out["methods"].items():
        g, se = m["auc_gain"], m["auc_gain_se"]
        if len(rewards) == 1:
            g, se = {rewards[0]: g}, {rewards[0]: se}
        cells = []
        for r in rewards:
            cells.append(f"{'n/a':>16}" if g[r] is None else f"{g[r]:>+9.2f}% ±{(se[r] or 0):4.2f}")
        starts = f"{m['starts'][0]}..{m['starts'][-1]}"
        print(f"{name:<16}{starts:>10}  " + "  ".join(cells))
