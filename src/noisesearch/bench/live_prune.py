"""Live pruning on digits-uncond: ``ttsnap`` (noise-aware prune reward) and ``ttsp`` (base reward)
against ``best-of-n`` at equal FLOPs, under the exact cost model, on held-out seeds.

Needs ``rewards/digit-noise-aware`` and ``pools/digits-eval`` (run ``noisesearch bench noise_aware``
first). Two parts:

1. **Schedule choice, offline.** On the evaluation pool (seed 1, never used below) the simulator
   replays a small grid of schedules for TTSnap (noise-aware scores) and TTSp (base scores); each
   method gets the schedule with the largest simulated AUC gain over best-of-N.
2. **Live runs.** For budgets of 2..20 best-of-N candidates (in FLOPs per sample: ``k * (18 * c +
   r)``), ``noisesearch generate`` runs each method on the 10 prompts x ``--samples`` searches, for
   ``--seeds`` seeds starting at 1000 (held out: neither the training pool, seed 0, nor the schedule
   choice, seed 1, saw them). Per seed the mean final reward gives one curve; the relative AUC gain
   over best-of-N (``noisesearch.simulate.metrics.auc_gain_with_se``: the TTSnap paper's metric, curves
   shifted by best-of-N at the smallest budget, Simpson's rule) is reported with its standard error
   over seeds. Every live run is charged by the budget: the FLOPs each search spent are checked
   against the budget.

Writes ``docs/live_prune.png`` and ``docs/live_prune_results.json``.

    noisesearch bench live_prune [--root .] [--seeds 4] [--samples 5]

``--sampler euler`` does the same on the deterministic Euler sampler with the pools and checkpoint of
``noisesearch bench noise_aware --sampler euler`` (``docs/live_prune_euler.*``); its schedule grid also
has checks at early steps, where a deterministic sampler's estimates already rank the candidates.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from noisesearch import api
from noisesearch.build import as_denoiser, as_reward
from noisesearch.io import atomic_write_text
from noisesearch.pools import load_pool
from noisesearch.pruning import CostSpec, FixedPolicy, PrunePlan, PruneSchedule
from noisesearch.simulate.engine import Replay, simulate
from noisesearch.simulate.metrics import auc_gain_with_se

ROOT = Path.cwd()  # run from the repository: docs/ and ../shared are found from here

GRID_STEPS = [(8,), (9,), (10,), (11,), (12,), (9, 11), (10, 12), (8, 10), (8, 11), (10, 11), (2, 5, 10)]
GRID_KEEP = [0.15, 0.25, 0.35, 0.5, 0.65]
GRID_STEPS_EARLY = [(0,), (2,), (4,), (6,), (2, 6), (4, 8), (2, 8), (0, 6)]  # added for deterministic samplers


def choose_schedules(pool, budgets, iters: int = 200, grid_steps=GRID_STEPS):
    """Best simulated schedule for TTSnap and for TTSp on ``pool`` (grid search), and the best TTSnap
    schedule whose checks all fall on steps the noise-aware reward covers (``na-steps``)."""
    rep = Replay(pool, ["digit"])
    cost = CostSpec.from_pool(pool, ["digit"])
    na = pool.noise_aware.get("digit")
    covered = set() if na is None else {s for s in range(pool.num_steps) if not np.isnan(na[:, :, s]).all()}
    cands = []
    for steps in grid_steps:
        if steps == (2, 5, 10):
            keeps = [(0.4, 0.4, 0.5)]  # the paper's schedule mapped to 18 steps
        else:
            keeps = [k for k in itertools.product(GRID_KEEP, repeat=len(steps))]
        for keep in keeps:
            cands.append(PruneSchedule(steps, keep))
    strategies = []
    for i, sched in enumerate(cands):
        for na_flag in (True, False):
            strategies.append(FixedPolicy(PrunePlan(sched, noise_aware=na_flag), name=f"{'ttsnap' if na_flag else 'ttsp'}-{i}"))
    sim = simulate(rep, strategies, budgets, cost, iters=iters, seed=0)
    best, table = {}, []
    for s in strategies:
        g, se = sim.gain(s.name)
        method = s.name.split("-")[0]
        sched = s.plan.schedule
        row = {"method": method, "schedule": sched.as_dict(), "gain": float(g[0]), "se": float(se[0]),
               "curve": sim.methods[s.name].curve[:, 0].tolist()}
        table.append({k: v for k, v in row.items() if k != "curve"})
        keys = [method]
        if method == "ttsnap" and set(sched.steps) <= covered:
            keys.append("ttsnap@na-steps")
        for key in keys:
            if key not in best or row["gain"] > best[key]["gain"]:
                best[key] = {**row, "schedule": sched}
    if "ttsnap@na-steps" in best:  # TTSp with the same schedule: isolates what the noise-aware scores change
        sched = best["ttsnap@na-steps"]["schedule"]
        twin = next(r for r, s in zip(table, strategies) if s.name.startswith("ttsp-") and s.plan.schedule == sched)
        best["ttsp@na-steps"] = {**twin, "schedule": sched,
                                 "curve": sim.methods[[s.name for s in strategies if s.name.startswith("ttsp-")
                                                       and s.plan.schedule == sched][0]].curve[:, 0].tolist()}
    best["best-of-n"] = {"curve": sim.methods["best-of-n"].curve[:, 0].tolist(), "gain": 0.0, "se": 0.0}
    return best, table


def live(method: str, budget: float, seed: int, samples: int, options: dict, sampler: str = "euler-ancestral") -> dict:
    run = api.generate(model="digits", prompts=[str(i) for i in range(10)], guidance=0, reward="digit",
                       sampler=sampler, strategy=method, budget_flops=budget, num_samples=samples, seed=seed,
                       strategy_options=options, evaluate=True)
    r = run.report
    assert r["flops_per_sample_max"] <= budget * (1 + 1e-12), "over budget"
    return {"reward_mean": r["reward_mean"], "judge_accuracy": r.get("judge_accuracy"),
            "flops_per_sample_max": r["flops_per_sample_max"],
            "candidates": r["strategy_info"].get("candidates"), "wall": r["wall_seconds"]}


def plot(budget_units, curves: dict, sim: dict, gains: dict, path: Path, sampler: str = "euler-ancestral") -> None:
    import matplotlib  # deferred: heavy, plots only (matplotlib)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: heavy, plots only (matplotlib)

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    colors = {"best-of-n": "tab:gray", "ttsp": "tab:orange", "ttsnap": "tab:blue",
              "ttsp@na-steps": "tab:red", "ttsnap@na-steps": "tab:cyan"}
    for m, c in curves.items():
        label = m if m == "best-of-n" else f"{m} [{sim[m]['schedule']}]: {gains[m]['gain']:+.1f}% ± {gains[m]['se']:.1f}"
        ax.errorbar(budget_units, c["mean"], yerr=c["se"], fmt="o-", ms=3, capsize=2, color=colors.get(m), label=label)
        bx.plot(budget_units, sim[m]["curve"], "o--", ms=3, lw=1, color=colors.get(m),
                label=m if m == "best-of-n" else f"{m}: {sim[m]['gain']:+.1f}%")
    for a, title in ((ax, "live, held-out seeds (AUC gain over best-of-N ± s.e.)"),
                     (bx, "simulated on the evaluation pool (seed 1)")):
        a.set_xlabel("budget per sample in best-of-N candidates (FLOPs-equal)")
        a.set_ylabel("mean final reward  log p(target | image)")
        a.set_title(f"digits-uncond ({sampler}): {title}", fontsize=9)
        a.grid(alpha=0.3)
        a.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _parser(prog) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path("."))
    ap.add_argument("--seeds", type=int, default=4, help="held-out seeds (1000, 1001, ...)")
    ap.add_argument("--samples", type=int, default=5, help="searches per prompt and seed")
    ap.add_argument("--units", default="2,4,6,8,10,12,14,16,18,20", help="budgets in best-of-N candidates")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs")
    ap.add_argument("--sampler", default="euler-ancestral", choices=["euler-ancestral", "euler"],
                    help="sampler (euler: the pools and checkpoint of noisesearch bench noise_aware --sampler euler)")
    return ap


def main(argv=None, prog=None) -> int:
    args = _parser(prog).parse_args(argv)

    torch.set_num_threads(1)
    suffix = "" if args.sampler == "euler-ancestral" else f"-{args.sampler}"
    pool, T = _eval_pool(args.root / f"pools/digits{suffix}-eval", args.sampler)
    units = np.array([float(u) for u in args.units.split(",")])
    budgets = units * T
    t0 = time.perf_counter()
    sim, table = choose_schedules(pool, budgets, grid_steps=GRID_STEPS + (GRID_STEPS_EARLY if suffix else []))
    print(f"schedule choice on the evaluation pool ({time.perf_counter() - t0:.0f} s):")
    for m in sim:
        if m != "best-of-n":
            print(f"  {m}: {sim[m]['schedule']}  simulated AUC gain {sim[m]['gain']:+.1f}% ± {sim[m]['se']:.1f}")
    opts = _methods(sim, args.root / f"rewards/digit-noise-aware{suffix}")
    seeds = [1000 + i for i in range(args.seeds)]
    per, judge, starts = _live_runs(opts, units, budgets, seeds, args, t0)
    curves, gains, paired = _summaries(opts, budgets, per, judge, starts)
    _print_results(opts, units, curves, gains, sim, paired)
    out = {
        "sampler": args.sampler,
        "budgets_in_best_of_n_candidates": units.tolist(),
        "flops_per_best_of_n_candidate": T,
        "seeds": seeds,
        "searches_per_point": 10 * args.samples * len(seeds),
        "schedules": {m: sim[m]["schedule"].as_dict() for m in opts if m != "best-of-n"},
        "simulated_gain": {m: {"gain": sim[m]["gain"], "se": sim[m]["se"]} for m in opts if m != "best-of-n"},
        "paired_ttsnap_minus_ttsp": paired,
        "simulated_grid": table,
        "live": curves,
        "per_seed": {m: per[m].tolist() for m in opts},
        "live_gain": gains,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    _write(args.docs, "live_prune" + suffix.replace("-", "_"), out, units, curves, sim, gains, args.sampler)
    return 0


def _eval_pool(path: Path, sampler: str):
    """The evaluation pool, checked against the sampler and the live cost of one best-of-N candidate (returned)."""
    pool = load_pool(path)
    if pool.extra.get("sampler", "euler-ancestral") != sampler:
        raise SystemExit(f"the evaluation pool was sampled with {pool.extra.get('sampler')}, not {sampler}")
    den, rew = as_denoiser("digits", guidance=0), as_reward("digit")
    T = 18 * den.flops_per_call + rew.flops_per_image
    assert abs(T - (pool.num_steps * pool.flops_per_step + pool.flops_per_reward["digit"])) < 1e-6 * T
    return pool, T


def _methods(sim: dict, reward_dir: Path) -> dict:
    """method key -> (strategy name, options) for best-of-N and every chosen schedule."""
    opts = {"best-of-n": ("best-of-n", {})}
    for key in ("ttsp", "ttsnap", "ttsp@na-steps", "ttsnap@na-steps"):
        if key in sim:
            sched = sim[key]["schedule"]
            o = {"prune_steps": sched.steps, "keep": sched.keep}
            if key.startswith("ttsnap"):
                o["prune_reward"] = str(reward_dir)
            opts[key] = (key.split("@")[0], o)
    return opts


def _live_runs(opts: dict, units, budgets, seeds: list[int], args, t0: float):
    """Every method at every budget and seed: mean final reward, judge accuracy [seeds, budgets], starts."""
    per = {m: np.zeros((len(seeds), len(budgets))) for m in opts}
    judge = {m: np.zeros((len(seeds), len(budgets))) for m in opts}
    starts = {m: [None] * len(budgets) for m in opts}
    for bi, B in enumerate(budgets):
        for m, (strategy, o) in opts.items():
            for si, seed in enumerate(seeds):
                r = live(strategy, B, seed, args.samples, o, args.sampler)
                per[m][si, bi] = r["reward_mean"]
                judge[m][si, bi] = r["judge_accuracy"]
                starts[m][bi] = r["candidates"]
        print(f"budget {units[bi]:>4g} x best-of-N: " + "  ".join(
            f"{m} {per[m][:, bi].mean():.3f} (n={starts[m][bi]})" for m in opts) + f"  [{time.perf_counter() - t0:.0f} s]", flush=True)
    return per, judge, starts


def _summaries(opts: dict, budgets, per: dict, judge: dict, starts: dict):
    """Curves (mean ± s.e. over seeds), AUC gains over best-of-N, and TTSnap - TTSp on the same schedule."""
    n = next(iter(per.values())).shape[0]
    curves = {m: {"mean": per[m].mean(0).tolist(),
                  "se": (per[m].std(0, ddof=1) / np.sqrt(n)).tolist() if n > 1 else [0.0] * len(budgets),
                  "judge_accuracy": judge[m].mean(0).tolist(), "starts": starts[m]} for m in opts}
    gains = {}
    for m in opts:
        if m != "best-of-n":
            g, se = auc_gain_with_se(budgets, per[m], per["best-of-n"])
            gains[m] = {"gain": g, "se": se}
    paired = None
    if "ttsnap@na-steps" in per:  # same candidates (same seeds and noise streams), only the prune scores differ
        diff = per["ttsnap@na-steps"] - per["ttsp@na-steps"]
        paired = {"mean_reward_diff_per_budget": diff.mean(0).tolist(),
                  "mean_reward_diff": float(diff.mean()),
                  "se": float(diff.mean(1).std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")}
    return curves, gains, paired


def _print_results(opts: dict, units, curves: dict, gains: dict, sim: dict, paired: dict | None) -> None:
    print()
    w = max(len(m) for m in opts) + 2
    print(f"{'budget':>6} " + " ".join(f"{m:>{w + 10}}" for m in opts))
    for bi in range(len(units)):
        print(f"{units[bi]:>6g} " + " ".join(
            f"{curves[m]['mean'][bi]:>{w}.3f} ± {curves[m]['se'][bi]:.3f}" for m in opts))
    print("(mean final reward over searches ± s.e. over seeds)")
    for m, g in gains.items():
        simg = sim[m]
        print(f"live relative AUC gain over best-of-N, {m} [{simg['schedule']}]: {g['gain']:+.1f}% ± {g['se']:.1f} "
              f"(simulated on the eval pool: {simg['gain']:+.1f}% ± {simg['se']:.1f})")
    if paired is not None:
        print(f"ttsnap - ttsp, same schedule and candidates: mean final reward {paired['mean_reward_diff']:+.3f} ± {paired['se']:.3f}")


def _write(d: Path, stem: str, out: dict, units, curves, sim, gains, sampler: str) -> None:
    d.mkdir(parents=True, exist_ok=True)
    plot(units, curves, sim, gains, d / f"{stem}.png", sampler)
    atomic_write_text(d / f"{stem}_results.json", json.dumps(out, indent=1) + "\n")
    print(f"wrote {d / f'{stem}.png'} and {d / f'{stem}_results.json'}")


if __name__ == "__main__":
    sys.exit(main())
