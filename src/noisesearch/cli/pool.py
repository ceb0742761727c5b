"""``noisesearch pool``: sample candidates with a model and record per-step rewards (a reward pool)."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from noisesearch.cli.common import (
    add_pipeline_options,
    add_threads,
    apply_threads,
    pipeline_model_options,
    resolve_device,
    write_run_config,
)
from noisesearch.cli.generate import read_prompts
from noisesearch.errors import NoiseSearchError
from noisesearch.validate import finite_float, int_in, nonneg_int, output_dir, positive_int

EPILOG = """examples:
  noisesearch pool --model digits --guidance 0 --reward digit --prompts 0,1,2,3,4,5,6,7,8,9 \\
      --candidates 200 --save-images --out pools/digits
  noisesearch pool --model digits --guidance 0 --reward digit,noise-aware@rewards/digit-noise-aware \\
      --prompts 0,1,2,3,4,5,6,7,8,9 --candidates 200 --seed 1 --out pools/digits-eval
  accelerate launch --multi_gpu --num_processes 2 -m noisesearch pool ... --device cpu   # shard prompts

A rerun with the same --out continues an interrupted run (finished prompts are kept in --out/parts;
a part that does not load is recomputed). --out must be new, empty or a previous pool run.
outputs in --out: pool.json (manifest, written last), <reward>.base.npy [prompt, candidate, step],
<reward>.noise_aware.npy (for noise-aware rewards), prompts.json, images/prompt_NNNNNN.zip (--save-images:
every estimate as PNG, or WebP with --image-format webp), config.yaml. The disk the pool needs is
estimated (from the encoded size of a probe estimate) and checked before the work.
"""


# the command's line in `noisesearch --help` (read without building its parser)
HELP = "sample candidates and record the reward of every step's Tweedie estimate (a reward pool)"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "pool",
        help=HELP,
        description="Sample --candidates trajectories per prompt and store the reward of the Tweedie estimate at "
        "every step, for each reward, in the simulator's pool format (resumable, shardable with accelerate).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("model and prompts")
    g.add_argument("--model", default="digits", help="'digits' (built in), a diffusers pipeline folder, or a hub name (default: digits)")
    g.add_argument("--guidance", type=finite_float(0, 1e4), default=1.0, help="0 = unconditional, 1 = conditional, > 1 classifier-free guidance (default: 1)")
    g.add_argument("--prompts", default=None, help="comma-separated prompts, e.g. 0,1,2,3,4,5,6,7,8,9")
    g.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable; may contain commas)")
    g.add_argument("--prompts-file", type=Path, help="file with one prompt per line (or a JSON list)")
    g.add_argument("--steps", type=int_in(1, 10000), default=None, help="sampling steps (default: the model's, 18 for digits)")
    g.add_argument("--sampler", default="euler-ancestral", help="euler-ancestral (default), euler, heun")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... or auto (default)")
    add_threads(g)
    g.add_argument("--max-batch", type=positive_int, default=512, help="rows per network call (default: 512)")

    g = p.add_argument_group("diffusers pipelines (SD, SDXL, FLUX, SD3, Lumina2)")
    add_pipeline_options(g)

    g = p.add_argument_group("pool")
    g.add_argument("--reward", action="append", default=[], help="reward spec(s), comma-separated or repeated, e.g. digit or "
                   "digit,noise-aware@DIR (a noise-aware reward is stored as the noise-aware variant of its base reward)")
    g.add_argument("--candidates", type=int_in(1, 10**6), default=200, help="candidates (starting noises) per prompt (default: 200)")
    g.add_argument("--seed", type=nonneg_int, default=0, help="seed of the candidates' noise streams (default: 0)")
    g.add_argument("--save-images", action="store_true", help="also store every estimate (images/, one zip per prompt; "
                   "needed by train-reward)")
    g.add_argument("--image-format", choices=["png", "webp"], default="png", help="how --save-images stores the "
                   "estimates: png (lossless, default) or webp (lossy, smaller; its effect on the reward: docs/noise_aware.md)")
    g.add_argument("--webp-quality", type=int_in(1, 100), default=None, help="quality of --image-format webp (default: 90)")
    g.add_argument("--max-prompts", type=nonneg_int, default=None, help="compute at most N missing prompts (per process) and stop; rerun to continue")
    g.add_argument("--out", type=Path, required=True, help="output folder")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(func=run)
    return p


def read_pool_prompts(args) -> list[str]:
    prompts = [s.strip() for s in (args.prompts or "").split(",") if s.strip()]
    args_copy = argparse.Namespace(prompt=list(args.prompt), prompts_file=args.prompts_file)
    if args.prompt or args.prompts_file:
        prompts += read_prompts(args_copy)
    if not prompts:
        raise NoiseSearchError("give prompts: --prompts 0,1,2 (comma-separated), --prompt TEXT or --prompts-file FILE")
    return prompts


def run(args) -> int:
    apply_threads(args)
    from noisesearch.api.pool import PoolConfig, generate_pool  # deferred: keeps `noisesearch --help` free of torch
    from noisesearch.rewards.base import split_specs  # deferred: keeps `noisesearch --help` free of torch

    prompts = read_pool_prompts(args)
    rewards = [s for text in (args.reward or ["digit"]) for s in split_specs(text)]
    output_dir(args.out, "pool", ["pool.json", "parts"])
    command = "noisesearch " + shlex.join(getattr(args, "argv", None) or sys.argv[1:])
    say = None if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    config = PoolConfig(
        guidance=args.guidance, steps=args.steps, sampler=args.sampler, seed=args.seed,
        device=resolve_device(args.device), max_batch=args.max_batch, save_images=args.save_images,
        image_format=args.image_format, webp_quality=args.webp_quality, max_prompts=args.max_prompts,
        progress=not (args.no_progress or args.quiet), command=command, model_options=pipeline_model_options(args),
        log=say, lock=False,  # the CLI holds io.output_lock(--out) around the command
    )
    pool = generate_pool(args.model, rewards, prompts, args.candidates, args.out, config)
    if pool is not None:
        write_run_config(args, args.out)
    if not args.quiet:
        _report(args, pool, prompts)
    return 0


def _report(args, pool, prompts) -> None:
    if pool is None:
        from noisesearch.pools.parts import PARTS  # deferred: keeps `noisesearch --help` free of torch

        done = len(list((args.out / PARTS).glob("prompt_*.npz")))
        if done < len(prompts):
            print(f"{done} of {len(prompts)} prompts done in {args.out}/{PARTS}; rerun the same command to continue")
        return
    P, N, S = pool.shape
    na = f", noise-aware: {', '.join(pool.noise_aware)}" if pool.noise_aware else ""
    print(
        f"pool {args.out}: {P} prompts x {N} candidates x {S} steps, rewards: {', '.join(pool.rewards)}{na}; "
        f"{pool.flops_per_step:.4g} FLOPs/step, {pool.extra.get('seconds', 0):.1f} s"
    )
