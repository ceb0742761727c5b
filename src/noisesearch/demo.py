"""``make demo``: compare strategies on digits-uncond at equal NFEs and print a table.

digits-uncond: the built-in digits model sampled *without* its class (guidance 0), reward
``digit`` = log p(target | image) from the shipped classifier, targets 0-9, 18 Euler-ancestral
steps (18 NFEs per sample). The independent judge (another architecture, another data split, never
optimised) tells real progress from reward hacking.

    python -m noisesearch.demo --out runs/demo [--budget-nfe 360] [--samples 4] [--seed 0]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from noisesearch import api
from noisesearch.errors import NoiseSearchError
from noisesearch.io import atomic_write_json, image_grid, save_png
from noisesearch.search import STRATEGIES

DEFAULT_STRATEGIES = ["naive", "best-of-n", "beam", "eps-greedy", "smc"]


def classifier_accuracy(run: api.Run) -> float:
    from noisesearch.rewards.digit import load_classifier

    classes, _ = load_classifier("cpu").predict(run.images)
    targets = torch.tensor([int(s["prompt"]) for s in run.report["samples"]])
    return float((classes == targets).float().mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m noisesearch.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--budget-nfe", type=float, default=360)
    p.add_argument("--samples", type=int, default=8, help="searches per target digit (default: 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES), help="comma separated (those not available are skipped)")
    args = p.parse_args(argv)
    strategies = [s for s in args.strategies.split(",") if s in STRATEGIES]
    targets = [str(d) for d in range(10)]
    print(
        f"digits-uncond: unconditional digits model, reward = log p(target | image), targets 0-9, "
        f"{args.samples} searches per target, {args.budget_nfe:g} NFEs per sample, seed {args.seed}"
    )
    rows, grids = [], []
    try:
        for name in strategies:
            t0 = time.perf_counter()
            run = api.generate(
                model="digits", prompts=targets, guidance=0.0, reward="digit", strategy=name,
                budget_nfe=args.budget_nfe, num_samples=args.samples, seed=args.seed, progress=True,
            )
            api.save_run(run, args.out / name, ncol=args.samples)
            r = run.report
            rows.append({
                "strategy": name,
                "nfe_max": r["nfe_max"],
                "reward_mean": r["reward_mean"],
                "classifier_accuracy": classifier_accuracy(run),
                "judge_accuracy": r["judge_accuracy"],
                "wall_seconds": r["wall_seconds"],
                "params": r["params"],
                "seconds_total": time.perf_counter() - t0,
            })
            # one column per target: the first search of each target
            grids.append(run.images.view(10, args.samples, *run.images.shape[1:])[:, 0])
    except NoiseSearchError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2
    save_png(args.out / "comparison.png", image_grid(torch.cat(grids), ncol=10))
    atomic_write_json(args.out / "summary.json", {"budget_nfe": args.budget_nfe, "samples_per_target": args.samples, "seed": args.seed, "rows": rows})

    head = f"{'strategy':<12} {'NFE/sample':>10} {'reward':>8} {'classifier acc':>15} {'judge acc':>10} {'wall s':>7}"
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['strategy']:<12} {r['nfe_max']:>10} {r['reward_mean']:>8.3f} {r['classifier_accuracy']:>15.3f} {r['judge_accuracy']:>10.3f} {r['wall_seconds']:>7.2f}")
    print(f"\nwrote {args.out}/comparison.png (rows: {', '.join(strategies)}; columns: targets 0-9), "
          f"{args.out}/summary.json and one folder per strategy (samples.png, report.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
