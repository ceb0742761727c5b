"""Noise-aware reward on digits-uncond: per-step Spearman correlation with the final reward and
top-k recall, base reward against noise-aware reward, on held-out candidates.

What it runs (each step is skipped when its output exists; ``--fresh`` redoes everything):

    noisesearch pool --model digits --guidance 0 --reward digit --prompts 0,1,2,3,4,5,6,7,8,9 \\
        --candidates 2000 --save-images --seed 0 --out pools/digits
    noisesearch train-reward --pool pools/digits --reward digit --out rewards/digit-noise-aware
    noisesearch pool --model digits --guidance 0 --reward digit,noise-aware@rewards/digit-noise-aware \\
        --prompts 0,1,2,3,4,5,6,7,8,9 --candidates 1000 --seed 1 --out pools/digits-eval

The evaluation pool uses another seed, so its candidates were never seen in training. For every
step it prints, averaged over the 10 prompts, the Spearman correlation of the step's score with the
final reward (per prompt, over its candidates) and the top-10% recall (share of the 10% best final
images found among the 10% best by the step's score), with the standard error over prompts; writes
``docs/noise_aware_spearman.png``, ``docs/noise_aware_recall.png`` and ``docs/noise_aware_results.json``.

    noisesearch bench noise_aware [--root .] [--train-args "--iters 300"]

``--sampler euler`` runs the same on the deterministic Euler sampler (eta = 0, the probability-flow
ODE: each candidate's final image is a function of its initial noise, as with FLUX's flow sampler
in the TTSnap paper), with its own pools (``pools/digits-euler``, ``pools/digits-euler-eval``),
checkpoint (``rewards/digit-noise-aware-euler``) and figures (``docs/noise_aware_euler_*``).
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from dataclasses import fields
from pathlib import Path

import numpy as np

from noisesearch.api.pool import generate_pool
from noisesearch.errors import NoiseSearchError
from noisesearch.io import atomic_write_text
from noisesearch.pools import load_pool
from noisesearch.train.noise_aware import TrainConfig, spearman_per_prompt, topk_recall, train_noise_aware

ROOT = Path.cwd()  # run from the repository: docs/ and ../shared are found from here

PROMPTS = "0,1,2,3,4,5,6,7,8,9"


def make_pool(out: Path, rewards: list[str], candidates: int, seed: int, sampler: str = "euler-ancestral",
              save_images: bool = False) -> None:
    """A digits-uncond pool over the 10 targets (``noisesearch.api.pool.generate_pool``; a complete
    pool in ``out`` is reused, a partial one continued)."""
    command = (f"noisesearch pool --model digits --guidance 0 --reward {','.join(rewards)} --prompts {PROMPTS} "
               f"--sampler {sampler} --candidates {candidates} --seed {seed}"
               + (" --save-images" if save_images else "") + f" --out {out}")
    print(f"$ {command}", flush=True)
    t0 = time.perf_counter()
    generate_pool("digits", rewards, PROMPTS.split(","), candidates, out, guidance=0.0, sampler=sampler, seed=seed,
                  device="cpu", save_images=save_images, command=command)
    print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)


def train_config(train_args: str, **fields_):
    """A ``TrainConfig`` from ``fields_`` and the train-reward flags in ``train_args``
    (``"--iters 300 --lora-rank 8 --no-gate --step-conditioning"``; each flag names a field)."""
    known = {f.name: f for f in fields(TrainConfig)}
    defaults = TrainConfig()
    tokens, values = shlex.split(train_args), dict(fields_)
    while tokens:
        flag = tokens.pop(0)
        name = flag.removeprefix("--").replace("-", "_")
        negated = name.startswith("no_") and name[3:] in known
        name = name[3:] if negated else name
        if not flag.startswith("--") or name not in known:
            raise NoiseSearchError(f"--train-args: unknown option {flag!r}; use --NAME VALUE with NAME among "
                                   f"{', '.join(n.replace('_', '-') for n in known)}")
        default = getattr(defaults, name)
        if isinstance(default, bool):
            values[name] = not negated
        elif not tokens:
            raise NoiseSearchError(f"--train-args: {flag} needs a value")
        else:
            text = tokens.pop(0)
            try:
                values[name] = tuple(int(x) for x in text.split(",") if x.strip()) if isinstance(default, tuple) \
                    else type(default)(text)
            except ValueError:
                raise NoiseSearchError(f"--train-args: {flag} takes {'integers' if isinstance(default, (int, tuple)) else 'a number'}, got {text!r}") from None
    config = TrainConfig(**values)
    config.check()
    return config


def train_reward(pool: Path, out: Path, config) -> dict:
    """``noisesearch.train.noise_aware.train_noise_aware`` (a finished reward in ``out`` is reused)."""
    print(f"$ train noise-aware reward {out} from {pool} ({config})", flush=True)
    t0 = time.perf_counter()
    manifest = train_noise_aware(pool, out, config, device="cpu", log=lambda msg: print(msg, file=sys.stderr))
    print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return manifest


def per_step_metrics(pool, name: str = "digit", top: float = 0.1) -> dict:
    base = pool.rewards[name]
    na = pool.scores(name, noise_aware=True)
    final = base[:, :, -1]
    P, N, S = base.shape
    k = max(1, int(round(top * N)))
    rows = []
    for s in range(S):
        sb, sn = spearman_per_prompt(base[:, :, s], final), spearman_per_prompt(na[:, :, s], final)
        rb, rn = topk_recall(base[:, :, s], final, k), topk_recall(na[:, :, s], final, k)
        d = sn - sb
        rows.append({
            "step": s,
            "sigma": pool.extra.get("sigmas", [None] * S)[s],
            "trained": bool(name in pool.noise_aware and not np.isnan(pool.noise_aware[name][:, :, s]).all()),
            "spearman_base": float(np.nanmean(sb)),
            "spearman_noise_aware": float(np.nanmean(sn)),
            "spearman_diff": float(np.nanmean(d)),
            "spearman_diff_se": float(np.nanstd(d, ddof=1) / np.sqrt(P)) if P > 1 else float("nan"),
            "spearman_diff_prompts_positive": int((d > 0).sum()),
            "recall_base": float(rb.mean()),
            "recall_noise_aware": float(rn.mean()),
            "recall_diff_se": float(np.std(rn - rb, ddof=1) / np.sqrt(P)) if P > 1 else float("nan"),
            "recall_diff_prompts_positive": int((rn - rb > 0).sum()),
        })
    return {"k": k, "top": top, "shape": [P, N, S], "steps": rows}


def plot(results: dict, out_dir: Path) -> list[Path]:
    import matplotlib  # deferred: heavy, plots only (matplotlib)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: heavy, plots only (matplotlib)

    rows = results["steps"]
    s = np.array([r["step"] for r in rows])
    top = int(results["top"] * 100)
    files = []
    for key, label, fname in [("spearman", "Spearman corr. with final reward", "noise_aware_spearman.png"),
                              ("recall", f"top-{top}% recall of final top-{top}%", "noise_aware_recall.png")]:
        fig, (ax, bx) = plt.subplots(2, 1, figsize=(6.4, 5.6), dpi=120, sharex=True,
                                     gridspec_kw={"height_ratios": [3, 2]})
        base = np.array([r[f"{key}_base"] for r in rows])
        na = np.array([r[f"{key}_noise_aware"] for r in rows])
        ax.plot(s, base, "o-", ms=4, label="base reward (digit)", color="tab:gray")
        ax.plot(s, na, "s-", ms=4, label="noise-aware reward", color="tab:blue")
        if key == "spearman":
            ax.axhline(0.9, color="k", lw=0.6, ls=":")
        ax.set_ylabel(label)
        ax.set_title(f"digits-uncond, {results.get('sampler', 'euler-ancestral')} sampler, held-out candidates "
                     f"({results['shape'][0]} prompts x {results['shape'][1]}, seed 1)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
        se = np.array([r[f"{key}_diff_se"] for r in rows])
        trained = np.array([r["trained"] for r in rows])
        bx.axhline(0, color="k", lw=0.8)
        bx.errorbar(s[trained], (na - base)[trained], yerr=se[trained], fmt="s", ms=4, capsize=2, color="tab:blue",
                    label="noise-aware - base (± s.e. over prompts)")
        if (~trained).any():
            bx.plot(s[~trained], (na - base)[~trained], "x", color="tab:gray", label="scored by the base reward")
        bx.set_ylabel("difference")
        bx.set_xlabel("step index s (Tweedie estimate after s + 1 NFEs; 17 = final image)")
        bx.grid(alpha=0.3)
        bx.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / fname.replace("noise_aware_", f"noise_aware{results.get('suffix', '')}_")
        fig.savefig(path)
        plt.close(fig)
        files.append(path)
    return files


def _parser(prog) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path("."), help="where pools/ and rewards/ go (default: .)")
    ap.add_argument("--train-candidates", type=int, default=2000)
    ap.add_argument("--eval-candidates", type=int, default=1000)
    ap.add_argument("--train-args", default="", help="extra train-reward options, e.g. '--iters 300 --lora-rank 8'")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs", help="where figures and results go")
    ap.add_argument("--sampler", default="euler-ancestral", choices=["euler-ancestral", "euler", "heun"],
                    help="sampler of the pools (default euler-ancestral: the search benchmark's digits-uncond)")
    ap.add_argument("--fresh", action="store_true", help="remove existing pools and checkpoint first")
    ap.add_argument("--retrain", action="store_true", help="remove the checkpoint (and the evaluation pool) first")
    return ap


def main(argv=None, prog=None) -> int:
    args = _parser(prog).parse_args(argv)

    suffix = "" if args.sampler == "euler-ancestral" else f"-{args.sampler}"
    train_pool, eval_pool = args.root / f"pools/digits{suffix}", args.root / f"pools/digits{suffix}-eval"
    reward_dir = args.root / f"rewards/digit-noise-aware{suffix}"
    config = train_config(args.train_args, reward="digit")  # bad --train-args: refused before any work
    if args.fresh or args.retrain:
        for d in ((train_pool,) if args.fresh else ()) + (eval_pool, reward_dir):
            shutil.rmtree(d, ignore_errors=True)
    t0 = time.perf_counter()
    make_pool(train_pool, ["digit"], args.train_candidates, 0, args.sampler, save_images=True)
    t_train = time.perf_counter()
    train_reward(train_pool, reward_dir, config)
    t_train = time.perf_counter() - t_train
    if (eval_pool / "pool.json").exists() and \
            (reward_dir / "noise_aware.json").stat().st_mtime > (eval_pool / "pool.json").stat().st_mtime:
        shutil.rmtree(eval_pool)  # the reward was retrained since: rescore the evaluation pool
    make_pool(eval_pool, ["digit", f"noise-aware@{reward_dir}"], args.eval_candidates, 1, args.sampler)
    res = per_step_metrics(load_pool(eval_pool))
    res["sampler"], res["suffix"] = args.sampler, suffix.replace("-", "_")
    manifest = json.loads((reward_dir / "noise_aware.json").read_text())
    res["train"] = {"config": manifest["config"], "seconds_total": sum(s["seconds"] for s in manifest["stages"]),
                    "stages": manifest["stages"], "train_candidates": manifest["train_candidates"]}
    res["seconds"] = round(time.perf_counter() - t0, 1)
    res["train_seconds_this_run"] = round(t_train, 1)
    _report(res, len(manifest["stages"]))
    _write(res, args.docs)
    return 0


def _report(res: dict, stages: int) -> None:
    """Print the per-step table; record which steps the noise-aware reward improves (``res["target"]``)."""
    print()
    print(f"held-out: {res['shape'][0]} prompts x {res['shape'][1]} candidates (seed 1); top-k recall with k = {res['k']}")
    print(f"{'step':>4} {'sigma':>8} {'spearman base':>14} {'noise-aware':>12} {'diff ± se':>16} {'prompts +':>9} "
          f"{'recall base':>12} {'noise-aware':>12}")
    for r in res["steps"]:
        sig = f"{r['sigma']:.3f}" if r["sigma"] is not None else "-"
        print(f"{r['step']:>4} {sig:>8} {r['spearman_base']:>14.3f} {r['spearman_noise_aware']:>12.3f} "
              f"{r['spearman_diff']:>+8.3f} ± {r['spearman_diff_se']:.3f} {r['spearman_diff_prompts_positive']:>6}/{res['shape'][0]} "
              f"{r['recall_base']:>12.3f} {r['recall_noise_aware']:>12.3f}")
    below = [r for r in res["steps"] if r["spearman_base"] < 0.9]
    met = [r["step"] for r in below if r["spearman_noise_aware"] > r["spearman_base"]]
    print(f"\nsteps with base Spearman < 0.9: {[r['step'] for r in below]}; noise-aware higher at {met} "
          f"({len(met)}/{len(below)})")
    print(f"training: {res['train']['seconds_total']:.0f} s over {stages} stages")
    res["target"] = {"steps_below_0.9": [r["step"] for r in below], "noise_aware_higher_at": met}


def _write(res: dict, docs: Path) -> None:
    docs.mkdir(parents=True, exist_ok=True)
    for f in plot(res, docs):
        print(f"wrote {f}")
    out = docs / f"noise_aware{res['suffix']}_results.json"
    atomic_write_text(out, json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
