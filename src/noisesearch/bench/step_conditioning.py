"""Step conditioning (adaLN-Zero / FiLM-Zero, one model for all steps) against per-step snapshots, on
digits-uncond: the same pool, curriculum and training budget; per-step Spearman correlation with
the final reward and top-10% recall on held-out candidates (another seed).

    noisesearch bench step_conditioning [--root .] [--train-args "--iters 150"]

Runs (skipping outputs that exist):

    noisesearch pool --model digits --guidance 0 --reward digit --prompts 0,...,9 --candidates 1000 \\
        --save-images --seed 0 --out pools/digits-sc
    noisesearch train-reward --pool pools/digits-sc --reward digit --out rewards/digit-na-snapshots --iters 150
    noisesearch train-reward --pool pools/digits-sc --reward digit --out rewards/digit-na-conditioned --iters 150 \\
        --step-conditioning
    noisesearch pool ... --reward digit,noise-aware@rewards/digit-na-VARIANT --candidates 500 --seed 1

and writes docs/step_conditioning_results.json. (The digit reward is a CNN: its conditioning is
FiLM-Zero on every hidden layer; on the ViT rewards it is adaLN-Zero.)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from noisesearch.bench.noise_aware import make_pool, per_step_metrics, train_config, train_reward
from noisesearch.pools import load_pool

ROOT = Path.cwd()  # run from the repository: docs/ is found from here


def main(argv=None, prog=None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path("."))
    ap.add_argument("--train-candidates", type=int, default=1000)
    ap.add_argument("--eval-candidates", type=int, default=500)
    ap.add_argument("--train-args", default="--iters 150")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs")
    args = ap.parse_args(argv)

    root = args.root
    train_pool = root / "pools/digits-sc"
    configs = {variant: train_config(args.train_args, gate=False, step_conditioning=conditioned)
               for variant, conditioned in (("snapshots", False), ("conditioned", True))}
    t0 = time.perf_counter()
    make_pool(train_pool, ["digit"], args.train_candidates, 0, save_images=True)
    results = {"train_candidates": args.train_candidates, "eval_candidates": args.eval_candidates,
               "train_args": args.train_args, "variants": {}}
    for variant, config in configs.items():
        rdir = root / f"rewards/digit-na-{variant}"
        t = time.perf_counter()
        train_reward(train_pool, rdir, config)
        train_s = time.perf_counter() - t
        epool = root / f"pools/digits-sc-eval-{variant}"
        make_pool(epool, ["digit", f"noise-aware@{rdir}"], args.eval_candidates, 1)
        res = per_step_metrics(load_pool(epool))
        res["train_seconds"] = round(train_s, 1)
        results["variants"][variant] = res
    snap, cond = results["variants"]["snapshots"]["steps"], results["variants"]["conditioned"]["steps"]
    print(f"\n{'step':>4} {'sigma':>8} {'base':>7} {'snapshots':>10} {'conditioned':>12}   recall: {'base':>6} {'snap':>6} {'cond':>6}")
    for a, b in zip(snap, cond):
        print(f"{a['step']:>4} {a['sigma']:>8.3f} {a['spearman_base']:>7.3f} {a['spearman_noise_aware']:>10.3f} "
              f"{b['spearman_noise_aware']:>12.3f}           {a['recall_base']:>6.3f} {a['recall_noise_aware']:>6.3f} "
              f"{b['recall_noise_aware']:>6.3f}")
    trained = [i for i, a in enumerate(snap) if a["trained"]]
    summary = {k: float(np.mean([results["variants"][v]["steps"][i][f"{m}_noise_aware"] for i in trained]))
               for v in ("snapshots", "conditioned") for m in ("spearman", "recall") for k in [f"{v}_{m}_mean"]}
    summary["base_spearman_mean"] = float(np.mean([snap[i]["spearman_base"] for i in trained]))
    summary["base_recall_mean"] = float(np.mean([snap[i]["recall_base"] for i in trained]))
    results["summary_over_trained_steps"] = summary
    results["seconds"] = round(time.perf_counter() - t0, 1)
    print("\nmean over trained steps:", json.dumps(summary, indent=1))
    out = args.docs / "step_conditioning_results.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
