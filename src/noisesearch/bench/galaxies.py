"""Noise search on a real pretrained model: galaxygrad's HSC galaxies, strategies at equal NFEs.

Every strategy gets the same budget of NFEs per output sample and runs ``--seeds`` independent
searches (one per output galaxy, each with its own noise stream) through the public API
(``noisesearch.api.generate``) on ``galaxygrad:hsc32`` (needs ``pip install --no-deps galaxygrad==0.1.9``
and the galaxy rewards' libraries, ``pip install 'noisesearch[galaxy]'``; ``make setup`` does both).
Reported per cell: the mean reward of the chosen samples with its standard error over the searches
(std / sqrt(n)), the NFEs spent and the wall seconds. ``naive`` (one sample, no search) is the
reference. The reward is a galaxy measurement (``noisesearch.rewards.galaxy``): by default
``ellipticity`` (1 - b/a from GalSim's adaptive moments), other measurements (size, concentration)
are reported on the chosen samples as unoptimised side effects.

    noisesearch bench galaxies                                      # the default run (a few minutes, 1 thread)
    noisesearch bench galaxies --reward galaxy-size@4 --budgets 64,256 --seeds 8 --out /tmp/g
    noisesearch bench galaxies --out docs                           # the figures of docs/galaxies.md
    noisesearch bench galaxies --reward-price 1 --strategies best-of-n,evo,auto --out /tmp/g1   # at equal FLOPs

``--reward-price P`` (issue 19) prices one reward call at ``P`` NFEs of the denoiser (the reward's
``flops_per_image`` = P x the model's FLOPs per call) and makes the budgets FLOP budgets given in
NFE-equivalents (``budget x flops_per_call``, network and reward together); every strategy fits
itself to what it can afford at that price. Without it the budgets are NFEs and the reward is free.

Outputs in ``--out``: ``galaxies_results.json`` (every cell), ``galaxies_results.md`` (the table),
``galaxies_reward_vs_nfe.png`` (mean reward +- standard error against NFEs) and
``galaxies_samples.png`` (a labelled grid: the first samples of each strategy at the largest budget).
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from noisesearch.api import generate
from noisesearch.build import as_denoiser, as_reward
from noisesearch.errors import BudgetError, NoiseSearchError
from noisesearch.figures import save_labelled_grid
from noisesearch.io import atomic_save_figure, atomic_write_json, atomic_write_text, output_lock
from noisesearch.search import make_strategy

PREFIX = "galaxies"
# name -> (strategy, options); the stepwise searches size themselves to the budget
CONFIGS = {
    "naive": ("naive", {}),
    "best-of-n": ("best-of-n", {}),
    "eps-greedy": ("eps-greedy", {}),
    "beam": ("beam", {}),
    "smc": ("smc", {}),
    # the newest methods and auto (issue 19), every knob left to the sizer
    "evo": ("evo", {}),
    "rbf": ("rbf", {}),
    "dts": ("dts", {}),
    "auto": ("auto", {}),
}
SIDE_REWARDS = ("ellipticity", "galaxy-size", "concentration")


def build_parser(prog: str | None = None, parser_class=argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = parser_class(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--model", default="galaxygrad:hsc32", help="a galaxygrad model (default galaxygrad:hsc32)")
    p.add_argument("--reward", default="ellipticity", help="the optimised reward (default ellipticity)")
    p.add_argument("--strategies", default="best-of-n,eps-greedy,beam,smc", help=f"from {', '.join(CONFIGS)}")
    p.add_argument("--budgets", default="64,128,256",
                   help="NFEs per output sample, or NFE-equivalents of FLOPs with --reward-price (default 64,128,256)")
    p.add_argument("--reward-price", type=float, default=None,
                   help="price of one reward call in NFEs of the denoiser: budgets become FLOP budgets (network + reward) "
                   "in NFE-equivalents (default: NFE budgets, the reward free)")
    p.add_argument("--seeds", type=int, default=16, help="searches (output galaxies) per cell (default 16)")
    p.add_argument("--steps", type=int, default=16, help="sampling steps of one trajectory (default 16)")
    p.add_argument("--sampler", default="euler-ancestral")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", type=int, default=8, help="samples per strategy in the image grid (default 8)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no line per finished cell on stderr")
    p.add_argument("--out", default="runs/bench-galaxies", help="output folder (docs writes the figures of docs/galaxies.md)")
    return p


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise NoiseSearchError(f"--{what} takes positive integers separated by commas, got {text!r}")
    return values


def _strategies(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [n for n in names if n not in CONFIGS]
    if not names or bad:
        raise NoiseSearchError(f"--strategies: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(CONFIGS)}")
    return names


def run_cell(denoiser, reward, side_rewards, name: str, budget: int, args) -> dict:
    """One strategy at one budget: ``args.seeds`` searches; a budget the strategy cannot use is 'refused'."""
    strategy, options = CONFIGS[name]
    t0 = time.perf_counter()
    try:
        run = generate(model=denoiser, prompts=[""], reward=reward, strategy=make_strategy(strategy, **options),
                       num_samples=args.seeds, steps=args.steps, sampler=args.sampler, seed=args.seed,
                       evaluate=False, eval_rewards=side_rewards, **limits(denoiser, budget, args.reward_price))
    except BudgetError as e:
        return {"strategy": name, "budget": budget, "refused": str(e)}
    rewards = [s["reward"] for s in run.report["samples"]]
    spend = {"flops_mean_in_nfe": statistics.fmean(s["flops"] for s in run.report["samples"]) / denoiser.flops_per_call,
             "reward_calls_mean": statistics.fmean(s["reward_calls"] for s in run.report["samples"])}
    cell = {"strategy": name, "budget": budget, "params": run.report["params"], "reward_mean": statistics.fmean(rewards),
            "reward_se": statistics.stdev(rewards) / math.sqrt(len(rewards)) if len(rewards) > 1 else 0.0,
            "rewards": rewards, "nfe_mean": statistics.fmean(s["nfe"] for s in run.report["samples"]),
            **spend, "wall_seconds": time.perf_counter() - t0,
            "strategy_info": {k: v for k, v in run.report["strategy_info"].items()
                              if isinstance(v, (int, float, str, bool)) or k in ("configuration", "auto")}}
    for r in side_rewards:
        values = [s["eval_rewards"][r.name] for s in run.report["samples"]]
        cell[f"eval:{r.name}"] = {"mean": statistics.fmean(values), "se": statistics.stdev(values) / math.sqrt(len(values))}
    cell["images"] = run.images[: args.grid]
    return cell


def limits(denoiser, budget: int, price: float | None) -> dict:
    """``generate``'s budget arguments: NFEs, or with a reward price FLOPs (budget NFE-equivalents) and the reward's price."""
    if price is None:
        return {"budget_nfe": budget}
    return {"budget_flops": budget * denoiser.flops_per_call, "reward_flops": price * denoiser.flops_per_call}


def table(cells: list[dict], strategies: list[str], budgets: list[int], reward: str, price: float | None = None) -> str:
    """Markdown: rows = budgets, columns = strategies, mean reward +- standard error."""
    unit = "NFEs / sample" if price is None else f"NFE-eq. FLOPs / sample (reward {price:g} NFE)"
    lines = [f"| {unit} | {' | '.join(strategies)} |", "|---:|" + "---:|" * len(strategies)]
    index = {(c["strategy"], c["budget"]): c for c in cells}
    for b in budgets:
        row = []
        for s in strategies:
            c = index.get((s, b))
            row.append("—" if c is None else "refused" if "refused" in c else f"{c['reward_mean']:.3f} ± {c['reward_se']:.3f}")
        lines.append(f"| {b} | {' | '.join(row)} |")
    return f"Mean {reward} of the chosen samples ± standard error over the searches.\n\n" + "\n".join(lines) + "\n"


def plot(cells: list[dict], strategies: list[str], reward: str, path: Path, command: str) -> None:
    import matplotlib  # deferred: plots only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: heavy, plots only (matplotlib)

    fig, ax = plt.subplots(figsize=(6, 4))
    for s in strategies:
        ok = [c for c in cells if c["strategy"] == s and "refused" not in c]
        if s == "naive" or not ok:
            continue
        ax.errorbar([c["budget"] for c in ok], [c["reward_mean"] for c in ok], yerr=[c["reward_se"] for c in ok],
                    marker="o", capsize=3, label=s)
    base = [c for c in cells if c["strategy"] == "naive" and "refused" not in c]
    if base:
        ax.axhline(base[0]["reward_mean"], color="grey", ls="--", label="no search (naive)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("NFEs per sample")
    ax.set_ylabel(f"{reward} (mean ± s.e.)")
    ax.set_title(command, fontsize=7)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_save_figure(path, fig, dpi=120)
    plt.close(fig)


def image_grid(cells: list[dict], strategies: list[str], budget: int, path: Path, title: str, grid: int) -> None:
    """Rows = strategies at ``budget`` (naive at its own), columns = the first samples, labelled."""
    rows, labels = [], []
    for s in strategies:
        c = next((c for c in cells if c["strategy"] == s and "refused" not in c and (c["budget"] == budget or s == "naive")),
                 None)
        if c is None:
            continue
        rows.append(c["images"][:grid])
        labels.append(f"{s}\n{c['nfe_mean']:.0f} NFE\nmean {c['reward_mean']:.2f}")
    n = min(len(r) for r in rows)
    images = torch.cat([r[:n] for r in rows])
    save_labelled_grid(path, images, len(rows), labels, [f"search {j}" for j in range(n)], title=title)


def naive_budget(args) -> int:
    """One plain sample: its steps, plus its one reward call (rounded up) when the reward is priced."""
    return args.steps + (math.ceil(args.reward_price) if args.reward_price else 0)


def run(args, command: str, save_config=None) -> int:
    strategies, budgets = _strategies(args.strategies), _ints(args.budgets, "budgets")
    if args.seeds < 2 or args.grid < 1 or args.threads < 1 or args.steps < 1:
        raise NoiseSearchError("--seeds must be at least 2 (standard errors), --grid, --threads and --steps at least 1")
    if args.reward_price is not None and not (math.isfinite(args.reward_price) and args.reward_price >= 0):
        raise NoiseSearchError(f"--reward-price must be a finite number >= 0 (NFEs per reward call), got {args.reward_price}")
    torch.set_num_threads(args.threads)
    denoiser = as_denoiser(args.model)
    reward = as_reward(args.reward)
    side = [as_reward(r) for r in SIDE_REWARDS if r != reward.name]
    out = Path(args.out)
    if "naive" not in strategies:
        strategies = ["naive", *strategies]
    with output_lock(out, command="noisesearch bench galaxies"):
        t0, cells = time.perf_counter(), []
        for name in strategies:
            for budget in [naive_budget(args)] if name == "naive" else budgets:
                cells.append(run_cell(denoiser, reward, side, name, budget, args))
                c = cells[-1]
                if not args.no_progress:
                    print(f"{name:>12} {budget:>5} NFE: " + (c["refused"] if "refused" in c else
                          f"{c['reward_mean']:.3f} ± {c['reward_se']:.3f} ({c['wall_seconds']:.1f} s)"), file=sys.stderr)
        write_outputs(cells, strategies, budgets, reward.name, out, command, args, time.perf_counter() - t0)
        if save_config is not None:
            save_config(out / f"{PREFIX}_config.yaml")
    return 0


def write_outputs(cells, strategies, budgets, reward: str, out: Path, command: str, args, seconds: float) -> None:
    meta = {"command": command, "model": args.model, "reward": reward, "reward_price_nfe": args.reward_price,
            "budget_kind": "nfe" if args.reward_price is None else "flops", "steps": args.steps, "sampler": args.sampler,
            "seeds": args.seeds, "seed": args.seed, "threads": args.threads, "total_seconds": seconds}
    atomic_write_json(out / f"{PREFIX}_results.json",
                      {"meta": meta, "cells": [{k: v for k, v in c.items() if k != "images"} for c in cells]})
    head = (f"`{command}`: {args.model}, {args.steps} {args.sampler} steps per trajectory, {args.seeds} searches per cell, "
            f"seed {args.seed}, {args.threads} thread(s), {seconds:.0f} s in all.\n\n")
    atomic_write_text(out / f"{PREFIX}_results.md", head + table(cells, strategies, budgets, reward, args.reward_price)
                      + spend_table(cells) + side_table(cells))
    plot(cells, strategies, reward, out / f"{PREFIX}_reward_vs_nfe.png", command)
    image_grid(cells, strategies, max(budgets), out / f"{PREFIX}_samples.png",
               f"{args.model}, reward {reward}, {max(budgets)} NFEs per sample", args.grid)
    print(json.dumps({"out": str(out), "seconds": round(seconds, 1)}))


def spend_table(cells: list[dict]) -> str:
    """What each cell spent (mean per search): NFEs, FLOPs in NFE-equivalents, reward calls, and its fitted sizes."""
    lines = ["", "Spent per search (mean) and the sizes each strategy fitted:", "",
             "| strategy | budget | NFEs | NFE-eq. FLOPs | reward calls | sizes |", "|---|---:|---:|---:|---:|---|"]
    for c in cells:
        if "refused" in c:
            lines.append(f"| {c['strategy']} | {c['budget']} | refused | | | {c['refused'][:80]} |")
            continue
        info = c["strategy_info"]
        sizes = ", ".join(f"{k}={v}" for k, v in info.items() if k not in ("configuration", "nfe", "reward_calls")
                          and isinstance(v, (int, str)) and len(str(v)) < 24)
        if "auto" in info:  # the strategy auto chose
            sizes = f"chose {info['auto'].get('strategy')}: {sizes}"
        lines.append(f"| {c['strategy']} | {c['budget']} | {c['nfe_mean']:.0f} | {c['flops_mean_in_nfe']:.1f} | "
                     f"{c['reward_calls_mean']:.0f} | {sizes[:120]} |")
    return "\n".join(lines) + "\n"


def side_table(cells: list[dict]) -> str:
    """The unoptimised galaxy measurements of the chosen samples (mean ± s.e.)."""
    keys = sorted({k for c in cells for k in c if k.startswith("eval:")})
    if not keys:
        return ""
    lines = ["", "Unoptimised measurements of the same samples (mean ± s.e.):", "",
             "| strategy | NFEs | " + " | ".join(k[5:] for k in keys) + " |", "|---|---:|" + "---:|" * len(keys)]
    for c in cells:
        if "refused" not in c:
            vals = " | ".join(f"{c[k]['mean']:.3f} ± {c[k]['se']:.3f}" for k in keys)
            lines.append(f"| {c['strategy']} | {c['budget']} | {vals} |")
    return "\n".join(lines) + "\n"


def main(argv=None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    command = f"{prog or 'python -m noisesearch.bench.galaxies'} {shlex.join(argv if argv is not None else sys.argv[1:])}"
    return run(args, command.strip())


if __name__ == "__main__":
    sys.exit(main())
